"""The evaluation job: an exported classifier scored exactly on one or several labelled test sets.

Length and truncation default to what the model was trained with (dapt/model/settings.py). For each
set, rank 0 writes its results with 95% intervals (dapt/layout.py: EvalLayout; `eval_results.json` for
one set, `eval_results-<name>.json` for several, plus `eval_table.md`), optionally every example's
prediction, records the numbers in the model's card (one entry per set; concurrent jobs are safe) and
logs them to W&B.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dapt.config import EvalConfig
from dapt.data.classify import eval_split
from dapt.data.labels import id2label
from dapt.distributed import DistInfo, barrier, setup_distributed, shutdown
from dapt.errors import DaptError
from dapt.eval.metrics import add_intervals, ci_text, format_table
from dapt.eval.scoring import autocast_for, inference_precision, score_classifier, score_with_predictions
from dapt.io import atomic_write_text, dump_json, write_jsonl
from dapt.layout import EvalLayout
from dapt.model.card import record_results
from dapt.model.loading import load_classifier, load_tokenizer, resolve_model
from dapt.model.settings import resolve_eval_settings
from dapt.model.surgery import cls_only_last_layer
from dapt.observe.tracking import log_evaluation

GENERIC_STEMS = {"test", "train", "validation", "valid", "dev", "data", "eval", "all"}


@dataclasses.dataclass(frozen=True)
class EvalSet:
    name: str
    cfg: EvalConfig  # the job's config with this set's data
    named: bool  # one of several (--eval_sets): its own file names


def set_name(cfg: EvalConfig) -> str:
    """A name for the data of a one-set evaluation: `--eval_name`, else from the data (`imdb-test`)."""
    if cfg.eval_name:
        return cfg.eval_name
    if cfg.prepared_dir:
        return Path(cfg.prepared_dir).name
    if cfg.data_files:
        first = Path(cfg.data_files[0])
        stem = first.name.split(".")[0] or first.name
        return f"{first.resolve().parent.name}-{stem}" if stem.lower() in GENERIC_STEMS else stem
    return f"{cfg.dataset_name.rsplit('/', 1)[-1]}-{cfg.dataset_split}"


def eval_sets(cfg: EvalConfig) -> list[EvalSet]:
    if not cfg.eval_sets:
        return [EvalSet(set_name(cfg), cfg, named=False)]
    sets = []
    for entry in cfg.eval_sets:
        name, _, path = entry.partition("=")
        sets.append(EvalSet(name, dataclasses.replace(cfg, data_files=[path], eval_sets=[]), named=True))
    return sets


def check_targets(layout: EvalLayout, sets: list[EvalSet], cfg: EvalConfig) -> None:
    """Results already on disk are never overwritten without --overwrite_output_dir."""
    for s in sets:
        target = layout.results_for(s.name if s.named else None)
        if target.exists() and not cfg.overwrite_output_dir:
            raise DaptError(f"{target} already exists; pass --overwrite_output_dir to replace it")


def run_evaluation(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Score cfg.model_name_or_path on each configured set; returns the results (on every rank)."""
    model_dir = resolve_model(cfg.model_name_or_path)
    resolve_eval_settings(cfg, model_dir)
    layout = EvalLayout(Path(cfg.output_dir))
    sets = eval_sets(cfg)
    check_targets(layout, sets, cfg)
    precision = inference_precision(cfg.precision)

    info = setup_distributed()
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, id2label=id2label(cfg.label_names)).to(info.device).eval()
    if cfg.cls_only_last_layer:
        cls_only_last_layer(model)

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_for(precision, info.device):
            return model(**batch).logits.float()

    all_results = [evaluate_set(s, forward, tokenizer, info, layout, model_dir, precision) for s in sets]
    if info.is_main:
        atomic_write_text(layout.table, combined_table(all_results))
        if len(sets) > 1:
            print(f"\n{combined_table(all_results)}\ncombined table: {layout.table}", flush=True)
    # The ranks leave together: the others wait here until rank 0 has written the results, the model card
    # (a file lock, often on a shared filesystem) and the W&B run. A launcher that ends the job once its first
    # task exits (`srun --wait=N`, slurm/launch.sh) would otherwise kill rank 0 mid-write. The wait is bounded
    # by the process group's timeout (DAPT_DIST_TIMEOUT_MINUTES, default 30); a rank 0 that fails instead
    # ends the others' wait (the connection closes; under NCCL, srun --wait ends them).
    barrier()
    if info.owns_group:
        shutdown()
    return all_results


def evaluate_set(s: EvalSet, forward: Callable, tokenizer: Any, info: DistInfo, layout: EvalLayout,
                 model_dir: str, precision: str) -> dict[str, Any]:
    cfg = s.cfg
    data = eval_split(cfg, info, tokenizer)
    start = time.perf_counter()
    if cfg.save_predictions:
        results, predictions = score_with_predictions(forward, data, info, cfg.eval_batch_size,
                                                      tokenizer.pad_token_id, info.device, id2label(cfg.label_names))
    else:
        results = score_classifier(forward, data, info, cfg.eval_batch_size, tokenizer.pad_token_id, info.device,
                                   id2label(cfg.label_names))
        predictions = None
    seconds = time.perf_counter() - start
    if results["n_examples"] != len(data):  # cannot happen unless sharding is broken: never report it
        raise RuntimeError(f"evaluated {results['n_examples']} examples, data has {len(data)}")
    add_intervals(results)
    results.update({
        "set": s.name,
        "split": None if cfg.data_files or cfg.prepared_dir else cfg.dataset_split,
        "model": model_dir,
        "data": cfg.prepared_dir or cfg.data_files or f"{cfg.dataset_name}:{cfg.dataset_split}",
        "max_seq_length": cfg.max_seq_length, "truncation": cfg.truncation, "head_tokens": cfg.head_tokens,
        "truncated_examples": int(sum(data["truncated"])),
        "world_size": info.world_size,
        "precision": precision,
        "eval_seconds": round(seconds, 3),
        "examples_per_second": round(len(data) / seconds, 2) if seconds else None,
    })
    if info.is_main:
        write_set(s, results, predictions, layout, model_dir, seconds, info.world_size)
    return results


def write_set(s: EvalSet, results: dict[str, Any], predictions: list[dict[str, Any]] | None, layout: EvalLayout,
              model_dir: str, seconds: float, world_size: int) -> None:
    """Rank 0: the results file, the predictions, the model card's entry for this set, and W&B."""
    cfg = s.cfg
    layout.root.mkdir(parents=True, exist_ok=True)
    path = layout.results_for(s.name if s.named else None)
    dump_json(results, path)
    print(f"\n[{s.name}]\n{format_table(results)}", flush=True)
    print(f"eval {s.name}: {results['n_examples']} examples in {seconds:.1f}s on {world_size} rank(s); "
          f"results: {path}", flush=True)
    if cfg.save_predictions and predictions is not None:
        pred_path = layout.predictions_for(s.name if s.named else None)
        write_jsonl(predictions, pred_path)
        print(f"predictions: {pred_path} ({len(predictions)} examples, input order)", flush=True)
    card = record_results(model_dir, results)  # the model card quotes these measured numbers
    if card is not None:
        print(f"model card updated: {card}", flush=True)
    log_evaluation(cfg, layout.root, results)  # W&B (if on), in the pipeline's group


def combined_table(all_results: list[dict[str, Any]]) -> str:
    """One Markdown row per set: size, accuracy and macro-F1 with their 95% intervals."""
    lines = ["| set | examples | accuracy [95% CI] | macro-F1 [95% CI] |", "|---|---:|---|---|"]
    for r in all_results:
        lines.append(f"| {r['set']} | {r['n_examples']} | {ci_text(r, 'accuracy')} | {ci_text(r, 'f1_macro')} |")
    return "\n".join(lines) + "\n"
