"""`dapt prepare` / launch/prepare.py: one stage's data, tokenised once, into a directory with a manifest."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

from dapt.commands import command
from dapt.config import STAGE_CONFIGS, OneLineParser, add_flag, parse_config
from dapt.errors import DaptError
from dapt.jobs.prepare import PrepareOptions, prepare

USAGE = "prepare --stage STAGE [--test_files STR ...] [--test_split STR] [--config RECIPE] [--FIELD VALUE ...]"


def _own_flags() -> OneLineParser:
    """prepare's own flags, from PrepareOptions' fields."""
    parser = OneLineParser(prog="prepare", add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("prepare options")
    for f in dataclasses.fields(PrepareOptions):
        # --stage picks the config the other flags belong to: required, and checked here
        add_flag(group, PrepareOptions, f, **({"required": True, "choices": f.metadata["choices"]}
                                              if f.name == "stage" else {}))
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[PrepareOptions, Any]:
    """`--stage` and the leakage flags are prepare's own; every other flag is the stage's config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own = _own_flags()
    if {"-h", "--help"} & set(argv) and not any(a.split("=")[0] == "--stage" for a in argv):
        OneLineParser(prog="prepare", parents=[own], usage=USAGE,
                      description="One stage's data, tokenised once, into a directory with a manifest (a "
                                  "stage's --prepared_dir).",
                      epilog="--stage STAGE --help lists that stage's flags too.").print_help()
        sys.exit(0)
    known, _ = own.parse_known_args(argv)
    opts = PrepareOptions(**{k: v for k, v in vars(known).items() if v is not None})
    cfg = parse_config(STAGE_CONFIGS[opts.stage], opts.stage, argv, parents=[own], usage=USAGE)
    if cfg.prepared_dir:
        raise DaptError("--prepared_dir is what a stage reads; prepare writes to --output_dir")
    return opts, cfg


@command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    opts, cfg = parse_args(argv)
    return prepare(opts, cfg)
