"""Classification data: reviews cut to length (head or head+tail) with their labels, padded per batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dapt.config import EvalConfig, FinetuneConfig
from dapt.data.prepared import load_prepared, stage_settings
from dapt.data.sources import load_table, split_validation
from dapt.data.text import cls_sep, encode_for_classification, map_procs
from dapt.distributed import DistInfo, node_main_first


def tokenize_for_classification(ds: Any, tokenizer: Any, max_seq_length: int, strategy: str,
                                head_tokens: int, num_proc: int | None = None) -> Any:
    cls_sep(tokenizer)  # a clear error before the map, not from inside a worker

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out, n_tokens = encode_for_classification(tokenizer, batch["text"], max_seq_length, strategy, head_tokens)
        return {"input_ids": out, "length": [len(x) for x in out],
                "truncated": [n > max_seq_length for n in n_tokens],
                "n_tokens": n_tokens}  # before truncation (data summaries)

    return ds.map(encode, batched=True, remove_columns=["text"], desc="tokenize", num_proc=map_procs(num_proc))


@dataclass
class PadCollator:
    """Pads a batch to its own longest member, not to max_seq_length."""

    pad_id: int

    def __call__(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        seqs = rows["input_ids"]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "label" in rows:
            batch["labels"] = torch.tensor(rows["label"], dtype=torch.long)
        return batch


def _encode(ds: Any, cfg: FinetuneConfig | EvalConfig, tokenizer: Any) -> Any:
    return tokenize_for_classification(ds, tokenizer, cfg.max_seq_length, cfg.truncation, cfg.head_tokens,
                                       cfg.num_proc)


def classification_splits(cfg: FinetuneConfig, info: DistInfo, tokenizer: Any) -> tuple[Any, Any | None]:
    """The fine-tune stage's tokenised train and held-out splits: from a prepared directory (settings
    checked), or read, split and tokenised here (the first rank of each datasets cache first, the
    others reuse it: see node_main_first)."""
    if cfg.prepared_dir:
        data = load_prepared(cfg.prepared_dir, stage_settings(cfg, "finetune", tokenizer))
        return data["train"], data.get("validation")
    with node_main_first(info):
        table = load_table(cfg, cfg.seed, label_column=cfg.label_column)
        train, val = split_validation(table, cfg.validation_split, cfg.seed)
        return _encode(train, cfg, tokenizer), (_encode(val, cfg, tokenizer) if val is not None else None)


def eval_split(cfg: EvalConfig, info: DistInfo, tokenizer: Any) -> Any:
    """The evaluation job's tokenised test set: from a prepared directory, or read and tokenised here."""
    if cfg.prepared_dir:
        return load_prepared(cfg.prepared_dir, stage_settings(cfg, "evaluate", tokenizer))["test"]
    with node_main_first(info):
        return _encode(load_table(cfg, seed=0, label_column=cfg.label_column), cfg, tokenizer)
