"""`dapt mlm` / launch/mlm.py: stage 1, continued masked-language-model pretraining on in-domain text."""
from __future__ import annotations

from typing import Any, Sequence

from dapt.commands import command
from dapt.config import MLMConfig, parse_config
from dapt.jobs.trainer import Trainer
from dapt.train.tasks import MLM


@command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return Trainer(parse_config(MLMConfig, "mlm", argv), MLM).run()
