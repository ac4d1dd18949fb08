"""`dapt pipeline` / launch/pipeline.py: MLM -> fine-tune -> evaluate -> export -> predict, on this machine.

    python launch/pipeline.py --demo --output_dir runs/demo
    python launch/pipeline.py --config recipes/imdb-bert-base.yaml --output_dir runs/imdb

`--demo` writes the project's synthetic reviews and uses `recipes/demo.yaml`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from dapt.commands import command
from dapt.config import REPO_ROOT, OneLineParser
from dapt.errors import DaptError
from dapt.pipeline import default_ranks, run_pipeline


@command
def main(argv: Sequence[str] | None = None) -> dict:
    ap = OneLineParser(prog="pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="runs/pipeline")
    ap.add_argument("--config", help="recipe file with mlm/finetune/evaluate sections")
    ap.add_argument("--demo", action="store_true", help="synthetic data + recipes/demo.yaml (CPU friendly)")
    ap.add_argument("--num_gpus", type=int, default=0, help="ranks per stage (default: all local accelerators, 2 on CPU)")
    ap.add_argument("--overwrite_output_dir", action="store_true")
    args = ap.parse_args(argv)
    if args.num_gpus < 0:
        raise DaptError(f"num_gpus must be >= 0 (0 = all local accelerators), got {args.num_gpus}")
    config = args.config or (str(REPO_ROOT / "recipes" / "demo.yaml") if args.demo else None)
    return run_pipeline(Path(args.output_dir).resolve(), config, args.demo, args.num_gpus or default_ranks(),
                        args.overwrite_output_dir)
