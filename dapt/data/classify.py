"""Classification data: reviews cut to length (head or head+tail) with their labels, padded per batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dapt.config import ID2LABEL, EvalConfig, FinetuneConfig
from dapt.data.labels import summary_line
from dapt.data.prepared import load_prepared, read_manifest, stage_settings
from dapt.data.sources import load_source, print_notes, split_validation
from dapt.data.text import cls_sep, encode_for_classification, map_procs, tokenize_fingerprint
from dapt.distributed import DistInfo, node_main_first
from dapt.errors import DaptError


def tokenize_for_classification(ds: Any, tokenizer: Any, max_seq_length: int, strategy: str,
                                head_tokens: int, num_proc: int | None = None) -> Any:
    cls_sep(tokenizer)  # a clear error before the map, not from inside a worker

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out, n_tokens = encode_for_classification(tokenizer, batch["text"], max_seq_length, strategy, head_tokens)
        return {"input_ids": out, "length": [len(x) for x in out],
                "truncated": [n > max_seq_length for n in n_tokens],
                "n_tokens": n_tokens}  # before truncation (data summaries)

    key = tokenize_fingerprint(ds, tokenizer, __name__, stage="classify", max_seq_length=max_seq_length,
                               strategy=strategy, head_tokens=head_tokens)
    return ds.map(encode, batched=True, remove_columns=["text"], desc="tokenize", num_proc=map_procs(num_proc),
                  new_fingerprint=key)


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


def class_counts(ds: Any, k: int) -> list[int]:
    """Examples per class id (the label column read as one numpy array, not row by row)."""
    return np.bincount(ds.with_format("numpy")["label"], minlength=k).tolist() if len(ds) else [0] * k


def prepared_label_names(cfg: FinetuneConfig | EvalConfig) -> list[str]:
    """The classes a prepared directory was made with (older directories: the binary default), checked
    against the run's own num_labels / label_names."""
    names = read_manifest(cfg.prepared_dir).get("labels", {}).get("names") or [ID2LABEL[0], ID2LABEL[1]]
    if (cfg.label_names and list(cfg.label_names) != names) or (cfg.num_labels and cfg.num_labels != len(names)):
        given = " ".join(cfg.label_names) if cfg.label_names else f"{cfg.num_labels} classes"
        raise DaptError(f"prepared data {cfg.prepared_dir} has the classes {', '.join(names)}; this run asks for "
                        f"{given} (prepare it again with these labels, or change them)")
    return names


def classification_splits(cfg: FinetuneConfig, info: DistInfo, tokenizer: Any) -> tuple[Any, Any | None, list[str]]:
    """The fine-tune stage's tokenised train and held-out splits and the class names (dapt/data/labels.py):
    from a prepared directory (settings checked), or read, split and tokenised here (the first rank of each
    datasets cache first, the others reuse it: see node_main_first). Rank 0 prints the classes once."""
    if cfg.prepared_dir:
        data = load_prepared(cfg.prepared_dir, stage_settings(cfg, "finetune", tokenizer))
        train, val, names = data["train"], data.get("validation"), prepared_label_names(cfg)
    else:
        with node_main_first(info):
            table, report = load_source(cfg, cfg.seed, cfg.label_column)
            print_notes(report)
            train, val = split_validation(table, cfg.validation_split, cfg.seed)
            train, val = _encode(train, cfg, tokenizer), (_encode(val, cfg, tokenizer) if val is not None else None)
        names = report.label_names
    if info.is_main:
        counts = [a + b for a, b in zip(class_counts(train, len(names)),
                                         class_counts(val, len(names)) if val is not None else [0] * len(names))]
        print(summary_line(names, counts), flush=True)
    return train, val, names


def eval_split(cfg: EvalConfig, info: DistInfo, tokenizer: Any) -> Any:
    """The evaluation job's tokenised test set: from a prepared directory, or read and tokenised here. Its
    labels are the model's classes (cfg.label_names, resolved from the model)."""
    if cfg.prepared_dir:
        prepared_label_names(cfg)
        return load_prepared(cfg.prepared_dir, stage_settings(cfg, "evaluate", tokenizer))["test"]
    with node_main_first(info):
        table, report = load_source(cfg, 0, cfg.label_column)
        print_notes(report)
        return _encode(table, cfg, tokenizer)
