"""`dapt pipeline` / launch/pipeline.py: MLM -> fine-tune -> evaluate -> export -> predict, on this machine.

    python launch/pipeline.py --demo --output_dir runs/demo
    python launch/pipeline.py --config recipes/imdb-bert-base.yaml --output_dir runs/imdb
    python launch/pipeline.py --config ... --output_dir runs/sweep --seeds 1 2 3 --learning_rates 2e-5 3e-5

`--demo` writes the project's synthetic reviews and uses `recipes/demo.yaml`. `--seeds` and/or
`--learning_rates` make it a sweep: one MLM stage (one per seed with `--mlm_per_seed`), then a fine-tune
(`--seed S --learning_rate LR`) and an evaluation per (learning rate, seed) in
`<output_dir>/runs/lr<LR>-seed<S>/`, summarised in `<output_dir>/sweep_results.json`, `sweep.md` and
`sweep.png` (`dapt summarize`). Without either flag, the recipe's seed and learning rate, one run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dapt.commands import command
from dapt.config import HelpFormatter, OneLineParser
from dapt.configs import find_recipe
from dapt.errors import DaptError
from dapt.jobs.pipeline import default_ranks, run_pipeline, run_sweep, sweep_grid


@command
def main(argv: Sequence[str] | None = None) -> dict:
    ap = OneLineParser(prog="pipeline", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--output_dir", default="runs/pipeline",
                    help="the pipeline's directory: data/, mlm/, finetune/, eval/ (dapt/layout.py)")
    ap.add_argument("--config", help="recipe file with mlm/finetune/evaluate sections")
    ap.add_argument("--demo", action="store_true", help="synthetic data + recipes/demo.yaml (CPU friendly)")
    ap.add_argument("--num_gpus", type=int, default=0, help="ranks per stage (default: all local accelerators, 2 on CPU)")
    ap.add_argument("--overwrite_output_dir", action="store_true",
                    help="replace what a non-empty --output_dir holds (a previous pipeline); without it, refused")
    ap.add_argument("--seeds", type=int, nargs="+", help="sweep: fine-tune once per seed (default: the recipe's)")
    ap.add_argument("--learning_rates", type=float, nargs="+",
                    help="sweep: fine-tune once per learning rate (default: the recipe's)")
    ap.add_argument("--mlm_per_seed", action="store_true", help="sweep: one MLM stage per seed (default: one shared)")
    args = ap.parse_args(argv)
    if args.num_gpus < 0:
        raise DaptError(f"num_gpus must be >= 0 (0 = all local accelerators), got {args.num_gpus}")
    if args.mlm_per_seed and not args.seeds:
        raise DaptError("--mlm_per_seed needs --seeds (one MLM stage per seed)")
    # one file for every job (a packaged recipe by name, or a path): checked here, before any job starts
    config = str(find_recipe(args.config or "demo").resolve()) if args.config or args.demo else None
    root = Path(args.output_dir).resolve()
    if args.seeds is None and args.learning_rates is None:
        return run_pipeline(root, config, args.demo, args.num_gpus or default_ranks(), args.overwrite_output_dir)
    seeds, rates = sweep_grid(config, args.seeds, args.learning_rates)  # checked before any job starts
    return run_sweep(root, config, args.demo, args.num_gpus or default_ranks(), args.overwrite_output_dir,
                     seeds, rates, args.mlm_per_seed)
