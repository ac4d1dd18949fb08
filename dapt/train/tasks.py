"""What each stage gives the one training loop: its data, loss, evaluation and export settings.

`Task` declares everything the loop (dapt/jobs/trainer.py) uses; the MLM and classification tasks
implement it. A `Stage` pairs a task builder with the model loader of that stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from dapt.config import FinetuneConfig, MLMConfig
from dapt.data.batching import IndexedRows, sharded_batches, to_device
from dapt.data.classify import PadCollator, classification_splits
from dapt.data.labels import id2label
from dapt.data.mlm import MLMCollator, mlm_splits, word_continuations
from dapt.distributed import DistInfo, all_reduce_sum
from dapt.eval.scoring import score_classifier
from dapt.model.loading import HeadReport, load_classifier, load_mlm_model_and_head
from dapt.model.surgery import SparseMLMOutput, cls_only_last_layer, use_sparse_head

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    """A stage's part of training. The loop calls nothing else."""

    arch: str  # "mlm" or "classifier": the model class export rebuilds
    train_rows: IndexedRows  # what the DataLoader indexes
    n_train: int
    # Per-example lengths for length bucketing (None: no bucketing, e.g. packed MLM blocks).
    lengths: Sequence[int] | None
    # True: the loss of an optimizer step is the sum over all its loss targets (all ranks, all
    # micro-batches) divided by their all-reduced count; False: the mean of micro-batch means.
    global_loss_norm: bool

    def n_targets(self, batch: Batch) -> int:
        """Loss targets in a host-side batch (masked tokens, or examples)."""

    def loss_sum(self, output: Any, n_targets: int) -> torch.Tensor:
        """The micro-batch's loss summed over its targets (for `global_loss_norm`)."""

    def collate(self, epoch: int) -> Callable[[dict[str, Any]], Batch]: ...

    def evaluate(self, engine: Any, info: DistInfo) -> dict[str, float]:
        """Held-out metrics (collective: every rank calls it); {} when there is no held-out data."""

    def probe(self) -> Batch:
        """A small fixed batch whose logits the export check compares."""

    def export_settings(self) -> dict[str, Any]:
        """Stored in the exported config.json under `dapt` (how inputs were cut)."""


@dataclass
class MLMTask:
    cfg: MLMConfig
    tokenizer: Any
    train_blocks: Any
    val_blocks: Any | None
    arch: str = "mlm"

    def __post_init__(self) -> None:
        self.train_rows = IndexedRows(self.train_blocks, ["input_ids"])
        self.n_train = len(self.train_blocks)
        self.lengths = None  # packed blocks are all full: nothing to bucket
        self.global_loss_norm = self.cfg.global_loss_norm
        # whole-word masking: which vocabulary ids are `##` pieces, read from the vocabulary once per run
        self.continuation = word_continuations(self.tokenizer) if self.cfg.whole_word_mask else None

    def n_targets(self, batch: Batch) -> int:
        return int((batch["labels"] != -100).sum())  # on the host, before the batch moves

    def loss_sum(self, output: Any, n_targets: int) -> torch.Tensor:
        # the sparse head returns the sum; the dense head (sparse_mlm_head off) a mean
        return output.loss_sum if isinstance(output, SparseMLMOutput) else output.loss * n_targets

    def collate(self, epoch: int) -> MLMCollator:
        tok = self.tokenizer
        return MLMCollator(special_ids=tuple(tok.all_special_ids), mask_id=tok.mask_token_id,
                           vocab_size=len(tok), probability=self.cfg.mlm_probability, seed=self.cfg.seed,
                           epoch=epoch, pad_id=tok.pad_token_id,
                           continuation=self.continuation, positions=self.cfg.sparse_mlm_head)

    @torch.no_grad()
    def evaluate(self, engine: Any, info: DistInfo) -> dict[str, float]:
        """Held-out loss over every masked token of the validation blocks (fixed masks), and perplexity."""
        if self.val_blocks is None:
            return {}
        collate = self.collate(epoch=-1)
        sums = torch.zeros(2, dtype=torch.float64)  # loss * targets, targets
        for indices, real in sharded_batches(len(self.val_blocks), info, self.cfg.eval_batch_size):
            batch = collate({"input_ids": self.val_blocks[indices]["input_ids"], "_index": indices})
            loss = engine(**to_device(batch, info.device)).loss.double().cpu()
            if real:
                n = self.n_targets(batch)
                sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        total = all_reduce_sum(sums, info)
        mean = float(total[0] / total[1])
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "masked_tokens": int(total[1])}

    def probe(self) -> Batch:
        source = self.val_blocks if self.val_blocks is not None else self.train_blocks
        return self.collate(epoch=-1)({"input_ids": source.select(range(1))["input_ids"], "_index": [0]})

    def export_settings(self) -> dict[str, Any]:
        return {"stage": "mlm", "max_seq_length": self.cfg.max_seq_length,
                "mlm_probability": self.cfg.mlm_probability}


@dataclass
class ClassificationTask:
    cfg: FinetuneConfig
    tokenizer: Any
    train_data: Any
    val_data: Any | None
    arch: str = "classifier"

    def __post_init__(self) -> None:
        self.train_rows = IndexedRows(self.train_data, ["input_ids", "label"])
        self.n_train = len(self.train_data)
        self.lengths = self.train_data["length"] if self.cfg.length_bucketing else None
        self.global_loss_norm = False  # every micro-batch has the same number of examples

    def n_targets(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])

    def loss_sum(self, output: Any, n_targets: int) -> torch.Tensor:
        return output.loss * n_targets

    def collate(self, epoch: int) -> PadCollator:
        return PadCollator(self.tokenizer.pad_token_id)

    def evaluate(self, engine: Any, info: DistInfo) -> dict[str, float]:
        if self.val_data is None:
            return {}
        res = score_classifier(lambda b: engine(**b).logits, self.val_data, info, self.cfg.eval_batch_size,
                               self.tokenizer.pad_token_id, info.device, id2label(self.cfg.label_names))
        return {"accuracy": res["accuracy"], "f1_macro": res["f1_macro"], "n_examples": res["n_examples"]}

    def probe(self) -> Batch:
        source = self.val_data if self.val_data is not None else self.train_data
        return self.collate(0)({"input_ids": source.select(range(min(2, len(source))))["input_ids"]})

    def export_settings(self) -> dict[str, Any]:
        return {"stage": "finetune", "max_seq_length": self.cfg.max_seq_length,
                "truncation": self.cfg.truncation, "head_tokens": self.cfg.head_tokens}


@dataclass(frozen=True)
class Stage:
    """A training stage: how to build its task and load its model (with its speed surgery). `load_model`
    also returns what loading found of the model's head (None: nothing to report), e.g. an MLM head that
    the checkpoint lacked (dapt.model.loading.HeadReport)."""

    name: str
    build_task: Callable[[Any, DistInfo, Any], Task]
    load_model: Callable[[Any, str], tuple[torch.nn.Module, HeadReport | None]]


def build_mlm_task(cfg: MLMConfig, info: DistInfo, tokenizer: Any) -> MLMTask:
    return MLMTask(cfg, tokenizer, *mlm_splits(cfg, info, tokenizer))


def load_mlm_for_training(cfg: MLMConfig, path: str) -> tuple[torch.nn.Module, HeadReport]:
    model, head = load_mlm_model_and_head(path, cfg.attn_implementation)
    return (use_sparse_head(model) if cfg.sparse_mlm_head else model), head


def build_classification_task(cfg: FinetuneConfig, info: DistInfo, tokenizer: Any) -> ClassificationTask:
    train, val, names = classification_splits(cfg, info, tokenizer)
    # The classes as resolved from the data: the model's head, run_config.json and the export all read them here.
    cfg.num_labels, cfg.label_names = len(names), list(names)
    return ClassificationTask(cfg, tokenizer, train, val)


def load_classifier_for_training(cfg: FinetuneConfig, path: str) -> tuple[torch.nn.Module, None]:
    model = load_classifier(path, cfg.attn_implementation, id2label(cfg.label_names))
    return (cls_only_last_layer(model) if cfg.cls_only_last_layer else model), None


MLM = Stage("mlm", build_mlm_task, load_mlm_for_training)
FINETUNE = Stage("finetune", build_classification_task, load_classifier_for_training)
