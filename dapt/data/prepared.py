"""Prepared data directories: what their manifest records, and the check a stage makes before using one.

A prepared directory holds exactly the splits a stage would otherwise compute (MLM: packed `train`
and `validation` blocks; fine-tune: tokenised and truncated `train` and `validation`; evaluate:
tokenised `test`), saved with `datasets.save_to_disk`, and `manifest.json`. A stage given the
directory compares the manifest's `settings` with its own and refuses any difference in one line.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dapt.config import EvalConfig, FinetuneConfig, MLMConfig
from dapt.errors import DaptError

MANIFEST = "manifest.json"
FORMAT = "dapt-prepared-data"
FORMAT_VERSION = 1


def vocab_hash(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token -> id), whatever folder or hub name the tokenizer came from."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def stage_settings(cfg: Any, stage: str, tokenizer: Any) -> dict[str, Any]:
    """Everything that decides a stage's tokenised data: prepared data must agree on each of them."""
    settings: dict[str, Any] = {"stage": stage, "tokenizer_vocab_hash": vocab_hash(tokenizer),
                                "max_seq_length": cfg.max_seq_length, "max_samples": cfg.max_samples}
    if isinstance(cfg, MLMConfig):
        settings.update(packing=getattr(cfg, "packing", True), validation_split=cfg.validation_split, seed=cfg.seed)
    elif isinstance(cfg, (FinetuneConfig, EvalConfig)):
        settings.update(packing=False, truncation=cfg.truncation,
                        head_tokens=cfg.head_tokens if cfg.truncation == "head+tail" else None)
        if isinstance(cfg, FinetuneConfig):
            settings.update(validation_split=cfg.validation_split, seed=cfg.seed)
    return settings


def hash_file(path: Path, h: Any) -> Any:
    """Feed a file's bytes to hash object `h` in 4 MiB chunks; returns `h`."""
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h


def content_fingerprint(root: Path, splits: list[str]) -> str:
    """sha256 over the Arrow files of every split: a changed or partly copied directory shows."""
    h = hashlib.sha256()
    for split in sorted(splits):
        for f in sorted((root / split).glob("*.arrow")):
            h.update(f"{split}/{f.name}\0".encode())
            hash_file(f, h)
    return h.hexdigest()


def _show(key: str, value: Any) -> str:
    return value[:12] if key == "tokenizer_vocab_hash" and isinstance(value, str) else repr(value)


def read_manifest(path: str) -> dict[str, Any]:
    root = Path(path)
    if not root.is_dir():
        raise DaptError(f"prepared_dir not found: {path}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DaptError(f"{path} is not a prepared data directory (no {MANIFEST}; write one with dapt prepare)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DaptError(f"{mpath} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DaptError(f"{mpath}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                        f"is not {FORMAT} version {FORMAT_VERSION}; prepare the data again with this dapt")
    return manifest


def check_manifest(manifest: dict[str, Any], expected: dict[str, Any], path: str) -> None:
    """One line that names every setting in which the prepared data differs from this run."""
    have = manifest.get("settings", {})
    diffs = [f"{k} is {_show(k, have.get(k))} there, {_show(k, v)} here" for k, v in expected.items()
             if have.get(k) != v]
    if diffs:
        raise DaptError(f"prepared data {path} does not match this run: {'; '.join(diffs)} "
                        f"(prepare it again with this config, or change the config)")


def load_prepared(path: str, expected: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    """The prepared splits, after the manifest check (and the content check when `verify`).

    Reads only local files: no hub, no network."""
    import datasets

    manifest = read_manifest(path)
    check_manifest(manifest, expected, path)
    splits = list(manifest.get("splits", {}))
    missing = [s for s in splits if not (Path(path) / s).is_dir()]
    if missing:
        raise DaptError(f"prepared data {path} lacks split folder(s) {', '.join(missing)} named in its manifest")
    if verify and content_fingerprint(Path(path), splits) != manifest.get("fingerprint"):
        raise DaptError(f"prepared data {path}: content fingerprint does not match its manifest "
                        f"(modified or partly copied?); prepare it again")
    datasets.disable_progress_bars()
    return {s: datasets.load_from_disk(str(Path(path) / s)) for s in splits}
