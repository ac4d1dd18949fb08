"""Text to token ids, the one way training, evaluation and prediction all cut reviews.

Cleaning (IMDB's HTML line breaks), head or head+tail truncation (Sun et al. 2019) and [CLS]/[SEP].
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from dapt.errors import DaptError

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Drop IMDB's HTML line breaks and collapse whitespace."""
    return _SPACE.sub(" ", _BR.sub(" ", text)).strip()


def truncate_ids(ids: list[int], budget: int, strategy: str, head_tokens: int) -> list[int]:
    """Cut token ids (without special tokens) to `budget`: the head, or head + tail (Sun et al. 2019)."""
    if len(ids) <= budget:
        return ids
    if strategy == "head":
        return ids[:budget]
    tail = budget - head_tokens
    return ids[:head_tokens] + ids[len(ids) - tail:]


def encode_for_classification(tokenizer: Any, texts: Sequence[str], max_seq_length: int, strategy: str,
                              head_tokens: int) -> tuple[list[list[int]], list[int]]:
    """[CLS] + truncated ids + [SEP] per cleaned text, and each text's token count before truncation
    (with the two special tokens). Training, evaluation and prediction all cut reviews here."""
    cls_id, sep_id = cls_sep(tokenizer)
    budget = max_seq_length - 2  # [CLS] ... [SEP]
    enc = tokenizer([clean_text(t) for t in texts], add_special_tokens=False, truncation=False,
                    return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
    return [[cls_id, *truncate_ids(ids, budget, strategy, head_tokens), sep_id] for ids in enc], [len(ids) + 2 for ids in enc]


def cls_sep(tokenizer: Any) -> tuple[int, int]:
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise DaptError("the tokenizer has no [CLS]/[SEP] tokens (a BERT-family tokenizer is needed)")
    return tokenizer.cls_token_id, tokenizer.sep_token_id


def map_procs(num_proc: int | None) -> int | None:
    return num_proc if num_proc and num_proc > 1 else None  # datasets: None = in this process
