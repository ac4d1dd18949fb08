"""Stage 2: sequence classification (negative/positive) with head or head+tail truncation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dapt.config import FinetuneConfig, parse_config
from dapt.data import (IndexedRows, PadCollator, load_table, split_validation, tokenize_for_classification)
from dapt.distributed import DistInfo, main_process_first
from dapt.errors import cli_entry
from dapt.evaluation import score_classifier
from dapt.manifest import load_prepared, stage_settings
from dapt.models import cls_only_last_layer, load_classifier
from dapt.training import run_stage


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

    def collate(self, epoch: int) -> PadCollator:
        return PadCollator(self.tokenizer.pad_token_id)

    def evaluate(self, engine: Any, info: DistInfo) -> dict[str, float]:
        if self.val_data is None:
            return {}
        res = score_classifier(lambda b: engine(**b).logits, self.val_data, info, self.cfg.eval_batch_size,
                               self.tokenizer.pad_token_id, info.device)
        return {"accuracy": res["accuracy"], "f1_macro": res["f1_macro"], "n_examples": res["n_examples"]}

    def probe(self) -> dict[str, torch.Tensor]:
        source = self.val_data if self.val_data is not None else self.train_data
        return self.collate(0)({"input_ids": source.select(range(min(2, len(source))))["input_ids"]})

    def export_settings(self) -> dict[str, Any]:
        return {"stage": "finetune", "max_seq_length": self.cfg.max_seq_length,
                "truncation": self.cfg.truncation, "head_tokens": self.cfg.head_tokens}


def build_task(cfg: FinetuneConfig, info: DistInfo, tokenizer: Any) -> ClassificationTask:
    if cfg.prepared_dir:  # tokenised by launch/prepare.py with the same settings (checked)
        data = load_prepared(cfg.prepared_dir, stage_settings(cfg, "finetune", tokenizer))
        return ClassificationTask(cfg, tokenizer, data["train"], data.get("validation"))
    with main_process_first(info):
        table = load_table(cfg, cfg.seed, label_column=cfg.label_column)
        train, val = split_validation(table, cfg.validation_split, cfg.seed)
        encode = lambda ds: tokenize_for_classification(ds, tokenizer, cfg.max_seq_length, cfg.truncation,  # noqa: E731
                                                        cfg.head_tokens, cfg.num_proc)
        train_data = encode(train)
        val_data = encode(val) if val is not None else None
    return ClassificationTask(cfg, tokenizer, train_data, val_data)


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(FinetuneConfig, "finetune", argv)

    def load(path: str) -> Any:
        model = load_classifier(path, cfg.attn_implementation)
        return cls_only_last_layer(model) if cfg.cls_only_last_layer else model

    return run_stage(cfg, build_task, load)
