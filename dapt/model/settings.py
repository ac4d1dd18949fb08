"""How a model was trained: the one reader that evaluation, prediction and the demo all use.

Export stores the fine-tune's input settings in the model's config.json under `dapt` (max_seq_length,
truncation, head_tokens). A model without them (not made by dapt) is cut with the package's defaults:
head+tail (Sun et al. 2019) with a quarter of the budget (at most 128 tokens) from the head, at 512
tokens or the model's position limit if smaller.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapt.config import EvalConfig, validate
from dapt.data.labels import class_names
from dapt.errors import DaptError
from dapt.io import read_json

DEFAULT_MAX_SEQ_LENGTH = 512
DEFAULT_TRUNCATION = "head+tail"
DEFAULT_HEAD_TOKENS = 128


@dataclass(frozen=True)
class InputSettings:
    max_seq_length: int
    truncation: str
    head_tokens: int


def _config(model_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(model_dir) / "config.json", {})  # {} for a hub id: nothing stored locally


def position_limit(model_dir: str | Path) -> int | None:
    """The longest input the model's position embeddings allow (None when unknown)."""
    return _config(model_dir).get("max_position_embeddings") or None


def default_head_tokens(max_seq_length: int) -> int:
    return max(1, min(DEFAULT_HEAD_TOKENS, (max_seq_length - 2) // 4))


def as_trained(model_dir: str | Path) -> InputSettings:
    """The settings the model was fine-tuned with, else the package defaults (module doc)."""
    trained = _config(model_dir).get("dapt") or {}
    limit = position_limit(model_dir)
    max_len = int(trained.get("max_seq_length") or min(DEFAULT_MAX_SEQ_LENGTH, limit or DEFAULT_MAX_SEQ_LENGTH))
    return InputSettings(max_seq_length=max_len, truncation=trained.get("truncation") or DEFAULT_TRUNCATION,
                         head_tokens=int(trained.get("head_tokens") or default_head_tokens(max_len)))


def check_length(max_seq_length: int, limit: int | None) -> None:
    """A length beyond the model's position embeddings fails now, not on the first long text mid-run."""
    if limit and max_seq_length > limit:
        raise DaptError(f"max_seq_length {max_seq_length} exceeds the model's limit of {limit} positions")


def resolve_eval_settings(cfg: EvalConfig, model_dir: str | Path) -> None:
    """Fill the evaluation config's unset length, truncation and classes as the model was trained, then
    check them: the test labels must be the model's classes (names or ids)."""
    trained = as_trained(model_dir)
    cfg.max_seq_length = cfg.max_seq_length or trained.max_seq_length
    cfg.truncation = cfg.truncation or trained.truncation
    if not cfg.head_tokens:  # the trained head, unless it does not fit a shorter length asked for here
        fits = trained.head_tokens < cfg.max_seq_length - 3
        cfg.head_tokens = trained.head_tokens if fits else default_head_tokens(cfg.max_seq_length)
    check_length(cfg.max_seq_length, position_limit(model_dir))
    trained_names = class_names(_config(model_dir).get("id2label"))
    if (cfg.label_names and list(cfg.label_names) != trained_names) or (
            cfg.num_labels and cfg.num_labels != len(trained_names)):
        given = " ".join(cfg.label_names) if cfg.label_names else f"{cfg.num_labels} classes"
        raise DaptError(f"the model was trained on the classes {', '.join(trained_names)}; this evaluation asks "
                        f"for {given} (leave num_labels / label_names unset to use the model's)")
    cfg.num_labels, cfg.label_names = len(trained_names), trained_names
    validate(cfg)
