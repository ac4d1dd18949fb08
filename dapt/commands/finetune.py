"""`dapt finetune` / launch/finetune.py: stage 2, sentiment classification (head or head+tail truncation)."""
from __future__ import annotations

from typing import Any, Sequence

from dapt.commands import command
from dapt.config import FinetuneConfig, parse_config
from dapt.jobs.trainer import Trainer
from dapt.train.tasks import FINETUNE


@command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return Trainer(parse_config(FinetuneConfig, "finetune", argv), FINETUNE).run()
