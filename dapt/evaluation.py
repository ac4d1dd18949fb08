"""Exact distributed evaluation, and the evaluation job.

Every rank scores a disjoint strided shard; together the shards are the data set, each example once
(no DistributedSampler padding). All ranks run the same number of forward passes, because ZeRO-3
gathers weights collectively; a rank whose shard is shorter runs padding batches whose results are
dropped. Counts are summed over ranks and the metrics are computed once from the totals.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from dapt.config import ID2LABEL, EvalConfig, dump_json, parse_config, validate
from dapt.data import PadCollator, eval_batches, eval_shard, load_table, num_eval_batches, tokenize_for_classification
from dapt.distributed import DistInfo, all_reduce_sum, main_process_first, setup_distributed, shutdown
from dapt.errors import DaptError, cli_entry
from dapt.metrics import confusion_counts, format_table, metrics_from_confusion
from dapt.models import resolve_model

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def sharded_batches(n_examples: int, info: DistInfo, batch_size: int,
                    lengths: Sequence[int] | None = None) -> Iterator[tuple[list[int], bool]]:
    """(indices, real) for this rank; padding batches (real=False) reuse example 0 so that every rank
    makes the same number of forward passes, even a rank whose shard is empty (N < world size)."""
    mine = eval_batches(eval_shard(n_examples, info.rank, info.world_size), batch_size, lengths)
    for b in range(num_eval_batches(n_examples, info.world_size, batch_size)):
        yield (mine[b], True) if b < len(mine) else ([0], False)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def score_classifier(forward: Forward, ds: Any, info: DistInfo, batch_size: int, pad_id: int,
                     device: torch.device) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class scores and the confusion matrix over all of `ds`, exactly."""
    if len(ds) == 0:
        raise DaptError("evaluation data is empty")
    collate = PadCollator(pad_id)
    counts = torch.zeros(len(ID2LABEL), len(ID2LABEL), dtype=torch.long)
    for indices, real in sharded_batches(len(ds), info, batch_size, ds["length"]):
        batch = collate(ds[indices])
        labels = batch.pop("labels")
        logits = forward(to_device(batch, device))
        if real:
            counts += confusion_counts(labels, logits.argmax(-1).cpu(), len(ID2LABEL))
    return metrics_from_confusion(all_reduce_sum(counts, info), ID2LABEL)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_precision(requested: str) -> str:
    """auto: bf16 (else fp16) on an accelerator that supports it, fp32 on CPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if requested != "auto":
        ok = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": bool(acc.is_fp16_supported())}[requested]
        if not ok:
            raise DaptError(f"precision {requested} is not supported by the {acc.device_name()} accelerator")
        return requested
    if acc.device_name() == "cpu":
        return "fp32"
    return "bf16" if acc.is_bf16_supported() else "fp16"


def trained_settings(model_dir: str) -> dict[str, Any]:
    """The length and truncation a dapt model was fine-tuned with (written by export)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("dapt", {}) or {}


def resolve_eval_settings(cfg: EvalConfig, model_dir: str) -> None:
    """Unset length/truncation: as the model was trained, else the package defaults."""
    trained = trained_settings(model_dir)
    cfg.max_seq_length = cfg.max_seq_length or trained.get("max_seq_length", 512)
    cfg.truncation = cfg.truncation or trained.get("truncation", "head+tail")
    cfg.head_tokens = cfg.head_tokens or trained.get("head_tokens", 128)
    validate(cfg)


def build_eval_data(cfg: EvalConfig, info: DistInfo, tokenizer: Any) -> Any:
    """The tokenised evaluation set: read from a prepared directory (manifest checked), or loaded and
    tokenised here (rank 0 first, the others reuse its cache)."""
    from dapt.manifest import load_prepared, stage_settings

    if cfg.prepared_dir:
        return load_prepared(cfg.prepared_dir, stage_settings(cfg, "evaluate", tokenizer))["test"]
    with main_process_first(info):
        table = load_table(cfg, seed=0, label_column=cfg.label_column)
        return tokenize_for_classification(table, tokenizer, cfg.max_seq_length, cfg.truncation, cfg.head_tokens,
                                           cfg.num_proc)


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    from dapt.models import cls_only_last_layer, load_classifier, load_tokenizer

    cfg = parse_config(EvalConfig, "evaluate", argv)
    model_dir = resolve_model(cfg.model_name_or_path)
    resolve_eval_settings(cfg, model_dir)
    out = Path(cfg.output_dir)
    results_path = out / "eval_results.json"
    if results_path.exists() and not cfg.overwrite_output_dir:
        raise DaptError(f"{results_path} already exists; pass --overwrite_output_dir to replace it")
    precision = inference_precision(cfg.precision)

    info = setup_distributed()
    tokenizer = load_tokenizer(model_dir)
    data = build_eval_data(cfg, info, tokenizer)
    model = load_classifier(model_dir).to(info.device).eval()
    if cfg.cls_only_last_layer:
        cls_only_last_layer(model)

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_for(precision, info.device):
            return model(**batch).logits.float()

    start = time.perf_counter()
    results = score_classifier(forward, data, info, cfg.eval_batch_size, tokenizer.pad_token_id, info.device)
    seconds = time.perf_counter() - start
    if results["n_examples"] != len(data):  # cannot happen unless sharding is broken: never report it
        raise RuntimeError(f"evaluated {results['n_examples']} examples, data has {len(data)}")
    results.update({
        "model": model_dir,
        "data": cfg.prepared_dir or cfg.data_files or f"{cfg.dataset_name}:{cfg.dataset_split}",
        "max_seq_length": cfg.max_seq_length,
        "truncation": cfg.truncation,
        "head_tokens": cfg.head_tokens,
        "truncated_examples": int(sum(data["truncated"])),
        "world_size": info.world_size,
        "precision": precision,
        "eval_seconds": round(seconds, 3),
        "examples_per_second": round(len(data) / seconds, 2) if seconds else None,
    })
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_json(results, results_path)
        print(format_table(results), flush=True)
        print(f"eval: {results['n_examples']} examples in {seconds:.1f}s on {info.world_size} rank(s); "
              f"results: {results_path}", flush=True)
        from dapt.model_card import update_with_eval
        from dapt.tracking import log_evaluation

        card = update_with_eval(model_dir, results)  # the model card quotes these measured numbers
        if card is not None:
            print(f"model card updated: {card}", flush=True)
        log_evaluation(cfg, out, results)  # W&B (if on), in the pipeline's group
    shutdown()
    return results
