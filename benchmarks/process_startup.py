"""What one fresh dapt process costs in CPU: the same 1-rank tiny MLM run (`python -m dapt mlm`, 9 steps), from
this checkout and from another revision of it (a temporary git worktree), interleaved, side by side. Nearly all
of it is start-up (imports, model and engine set-up): what every rank of every job, srun task and requeued run
pays before its first step.

    .venv/bin/python benchmarks/process_startup.py --baseline 444d87b [--reps 5]

Prints one line per run and a JSON summary (median CPU seconds, user + system, and wall seconds per arm).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rank_startup import ROOT, make_inputs


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(tree: Path, args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU, wall) seconds of `python -m dapt mlm args` with `tree`'s dapt."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dapt", "mlm", *args], cwd=tree, env={**env, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run from {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return cpu_seconds() - cpu, time.perf_counter() - wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a git revision of this checkout to compare with")
    ap.add_argument("--reps", type=int, default=5)
    opts = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dapt-process-startup-"))
    baseline = scratch / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(baseline), opts.baseline],
                   check=True)
    try:
        model, data = make_inputs(scratch)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   HF_DATASETS_CACHE=str(scratch / "hf"), TRANSFORMERS_VERBOSITY="error",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("TORCHDYNAMO_DISABLE", None)  # each revision's own default
        out = scratch / "run"
        args = ["--model_name_or_path", str(model), "--data_files", str(data), "--output_dir", str(out),
                "--overwrite_output_dir", "--ds_config", "zero2_auto", "--max_seq_length", "64", "--num_epochs", "1",
                "--learning_rate", "1e-3", "--warmup", "0.1", "--validation_split", "0.1", "--effective_batch_size",
                "16", "--micro_batch_size", "4", "--seed", "3", "--save_steps", "0"]
        arms = {f"baseline {opts.baseline}": baseline, "this checkout": ROOT}
        run_once(ROOT, args, env)  # not counted: fills the datasets cache and checks DeepSpeed's JIT op once
        cpu: dict[str, list[float]] = {a: [] for a in arms}
        wall: dict[str, list[float]] = {a: [] for a in arms}
        for rep in range(opts.reps):
            for arm, tree in arms.items():
                c, w = run_once(tree, args, env)
                cpu[arm].append(c)
                wall[arm].append(w)
                print(f"rep {rep + 1} {arm:>20}: {c:5.2f} s CPU, {w:5.2f} s wall", flush=True)
        summary = {a: {"cpu_s": round(statistics.median(cpu[a]), 2), "wall_s": round(statistics.median(wall[a]), 2),
                       "cpu_range_s": [round(min(cpu[a]), 2), round(max(cpu[a]), 2)]} for a in arms}
        print(json.dumps({"median": summary, "reps": opts.reps}))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
