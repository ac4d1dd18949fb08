"""`dapt prepare` / launch/prepare.py: one stage's data, tokenised once, into a directory with a manifest."""
from __future__ import annotations

from typing import Any, Sequence

from dapt.commands import command
from dapt.config import STAGE_CONFIGS, OneLineParser, parse_config
from dapt.data.prepare import STAGES, PrepareOptions, prepare
from dapt.errors import DaptError


def parse_args(argv: Sequence[str] | None) -> tuple[PrepareOptions, Any]:
    """`--stage` and the leakage flags are prepare's own; every other flag is the stage's config."""
    parser = OneLineParser(prog="prepare", add_help=False, allow_abbrev=False)
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--test_files", nargs="+", default=[])
    parser.add_argument("--test_split", default="test")
    known, rest = parser.parse_known_args(argv)
    opts = PrepareOptions(known.stage, known.test_files, known.test_split)
    cfg = parse_config(STAGE_CONFIGS[opts.stage], opts.stage, rest)
    if cfg.prepared_dir:
        raise DaptError("--prepared_dir is what a stage reads; prepare writes to --output_dir")
    return opts, cfg


@command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    opts, cfg = parse_args(argv)
    return prepare(opts, cfg)
