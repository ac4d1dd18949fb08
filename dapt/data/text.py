"""Text to token ids, the one way training, evaluation and prediction all cut reviews.

Cleaning (IMDB's HTML line breaks), head or head+tail truncation (Sun et al. 2019) and [CLS]/[SEP].
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from dapt.data.prepared import hash_file
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


def tokenize_fingerprint(ds: Any, tokenizer: Any, module: str, **settings: Any) -> str | None:
    """The cache key of a tokenising `ds.map` in `module`, or None for datasets' own.

    datasets keys a map's cache file by pickling the mapped function, tokenizer and all: ~0.15 s a map, paid
    by every rank of every run (each looks its cache up). The same key from what decides the output: the
    input's fingerprint, the tokenizer's whole pipeline (the fast tokenizer's serialised form: vocabulary,
    normaliser, pre-tokeniser, added tokens; not the truncation and padding each call sets) and its plain
    settings, the map's settings, this module's and the calling module's source, and the library versions.
    A slow (Python) tokenizer has no serialised form: None, and datasets hashes it as before."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fingerprint = getattr(ds, "_fingerprint", None)
    if backend is None or not fingerprint:
        return None
    import datasets
    import tokenizers
    import transformers

    plain = {k: v for k, v in sorted(getattr(tokenizer, "init_kwargs", {}).items()) if _plain(v)}
    parts = [fingerprint, type(tokenizer).__qualname__, _pipeline(backend), json.dumps(plain, sort_keys=True),
             json.dumps(settings, sort_keys=True, default=str),
             datasets.__version__, tokenizers.__version__, transformers.__version__]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    for name in (__name__, module):  # the code that cleans, cuts and encodes
        hash_file(Path(sys.modules[name].__file__), digest)
    return digest.hexdigest()[:32]


def _pipeline(backend: Any) -> str:
    """The fast tokenizer's serialised form from "added_tokens" on: the keys before it are the format version
    (kept) and the truncation and padding that each call sets from its own arguments (ours: none), which
    would make the key depend on earlier calls. The whole form if the layout is not the expected one."""
    text = backend.to_str()
    cut = text.find(',"added_tokens":')
    if cut < 0 or '"version"' not in text[:cut]:
        return text
    return text[:cut].split(",", 1)[0] + text[cut:]


def _plain(value: Any) -> bool:
    """JSON values whose text is the same in every process (no object reprs with addresses)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False
