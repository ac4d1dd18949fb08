"""`dapt evaluate` / launch/evaluate.py: exact distributed evaluation of an exported classifier."""
from __future__ import annotations

from typing import Any, Sequence

from dapt.commands import command
from dapt.config import EvalConfig, parse_config
from dapt.jobs.evaluate import run_evaluation


@command
def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run_evaluation(parse_config(EvalConfig, "evaluate", argv))
