"""Exact distributed scoring of a classifier.

Every rank scores a disjoint strided shard; together the shards are the data set, each example once
(no DistributedSampler padding). All ranks run the same number of forward passes, because ZeRO-3
gathers weights collectively; a rank whose shard is shorter runs padding batches whose results are
dropped. Counts are summed over ranks and the metrics are computed once from the totals.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from dapt.config import ID2LABEL
from dapt.data.batching import sharded_batches, to_device
from dapt.data.classify import PadCollator
from dapt.distributed import DistInfo, all_reduce_sum
from dapt.errors import DaptError
from dapt.eval.metrics import confusion_counts, metrics_from_confusion

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@torch.no_grad()
def _score(forward: Forward, ds: Any, info: DistInfo, batch_size: int, pad_id: int, device: torch.device,
           keep: bool, k: int) -> tuple[torch.Tensor, list[tuple[int, list[float]]]]:
    """This rank's confusion counts (k x k: the all-reduce payload), and (keep=True) its (index, class
    probabilities) pairs."""
    if len(ds) == 0:
        raise DaptError("evaluation data is empty")
    collate = PadCollator(pad_id)
    counts = torch.zeros(k, k, dtype=torch.long)
    mine: list[tuple[int, list[float]]] = []
    for indices, real in sharded_batches(len(ds), info, batch_size, ds["length"]):
        batch = collate(ds[indices])
        labels = batch.pop("labels")
        logits = forward(to_device(batch, device)).float()
        if logits.shape[-1] != k:
            raise DaptError(f"the model has {logits.shape[-1]} outputs for {k} classes")
        if real:
            counts += confusion_counts(labels, logits.argmax(-1).cpu(), k)
            if keep:
                mine.extend(zip(indices, torch.softmax(logits, dim=-1).cpu().tolist()))
    return counts, mine


def score_classifier(forward: Forward, ds: Any, info: DistInfo, batch_size: int, pad_id: int,
                     device: torch.device, id2label: Mapping[int, str] = ID2LABEL) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class scores and the confusion matrix over all of `ds`, exactly, for the
    classes `id2label` (ids 0..K-1)."""
    counts, _ = _score(forward, ds, info, batch_size, pad_id, device, keep=False, k=len(id2label))
    return metrics_from_confusion(all_reduce_sum(counts, info), id2label)


def score_with_predictions(forward: Forward, ds: Any, info: DistInfo, batch_size: int, pad_id: int,
                           device: torch.device, id2label: Mapping[int, str] = ID2LABEL
                           ) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """As score_classifier, plus (on rank 0; None elsewhere) every example's prediction, once each, in
    input order: its row in the input, its id (if the input has an id column), label, predicted label and
    the probability of each class."""
    counts, mine = _score(forward, ds, info, batch_size, pad_id, device, keep=True, k=len(id2label))
    results = metrics_from_confusion(all_reduce_sum(counts, info), id2label)
    parts: list[Any] = [mine]
    if info.world_size > 1:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, mine)
    if not info.is_main:
        return results, None
    probs = dict(pair for part in parts for pair in part)
    if sorted(probs) != list(range(len(ds))):  # every example exactly once, or nothing is reported
        raise RuntimeError(f"gathered predictions for {len(probs)} distinct examples, data has {len(ds)}")
    columns = set(ds.column_names)
    rows = ds["row"] if "row" in columns else list(range(len(ds)))
    ids = ds["id"] if "id" in columns else None
    names = [id2label[k] for k in range(len(id2label))]
    out = []
    for i, (row, label) in enumerate(zip(rows, ds["label"])):
        p = probs[i]
        out.append({"row": row, **({"id": ids[i]} if ids is not None else {}), "label": names[label],
                    "predicted": names[max(range(len(p)), key=p.__getitem__)],
                    "probabilities": dict(zip(names, p))})
    return results, out


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
