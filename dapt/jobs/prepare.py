"""The prepare step: read (hub or local files), validate, clean, tokenise and pack or truncate one
stage's data once, offline from training, into a directory with a manifest.

    python launch/prepare.py --stage finetune --config recipes/imdb-bert-base.yaml --output_dir /shared/prep/ft

The stage's own config class parses every other flag (same recipe file, same defaults), and the
stage's own build function makes the data (one process, `num_proc` tokenising workers), so a
prepared directory holds exactly what the training job would compute; the job re-checks the
manifest anyway. Nothing partial is left behind: the directory is written beside its target
and renamed into place.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dapt.config import ID2LABEL, flag, to_dict
from dapt.data.classify import classification_splits, eval_split
from dapt.data.labels import is_default_binary
from dapt.data.mlm import mlm_splits, tokenize_for_mlm
from dapt.data.prepared import FORMAT, FORMAT_VERSION, MANIFEST, content_fingerprint, hash_file, stage_settings
from dapt.data.sources import CHUNK_ROWS, SourceReport, aclimdb_root, load_source, split_validation
from dapt.data.text import clean_text
from dapt.distributed import DistInfo
from dapt.errors import DaptError
from dapt.io import dump_json
from dapt.model.loading import load_tokenizer, resolve_model
from dapt.model.settings import check_length, position_limit, resolve_eval_settings
from dapt.version import __version__

STAGES = ("mlm", "finetune", "evaluate")


@dataclasses.dataclass
class PrepareOptions:
    """Flags of the prepare step itself; every other flag belongs to the stage's config."""

    stage: str = flag("", "the stage whose data to prepare: its flags follow (required)", choices=STAGES)
    test_files: list[str] = flag([], "evaluation text, read only to count the training texts it shares "
                                     "(leakage); none: the hub dataset's, or the aclImdb tree's, --test_split "
                                     "(other local data needs --test_files)")
    test_split: str = flag("test", "the split read for that count when --test_files is not given")


def guard_target(out: Path, overwrite: bool) -> None:
    """Refuse to replace a previous prepared set unless told to, and never replace anything else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / MANIFEST).is_file():
        raise DaptError(f"output_dir {out} exists and is not a prepared data directory; choose another directory")
    if not overwrite:
        raise DaptError(f"output_dir {out} already holds prepared data; pass --overwrite_output_dir to replace it")


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    if not len(lengths):
        return {}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"tokens_p50": int(p50), "tokens_p90": int(p90), "tokens_p99": int(p99), "tokens_max": int(lengths.max())}


def _rows_of(ds: Any, values: np.ndarray) -> np.ndarray:
    """Per-row values computed on a dataset's Arrow table, in the dataset's row order (through its indices
    mapping, if any: a `select` or `shuffle` that was not flattened). No copy of the data is made."""
    indices = getattr(ds, "_indices", None)
    return values[indices.column(0).to_numpy()] if indices is not None else values


def _column(ds: Any, name: str) -> np.ndarray:
    """One scalar column as numpy, read from the memory-mapped Arrow table: O(rows) numbers, no Python
    objects per row."""
    return _rows_of(ds, ds.data.column(name).to_numpy())


def summarize_classification(ds: Any, names: Sequence[str] = (ID2LABEL[0], ID2LABEL[1])) -> dict[str, Any]:
    """Examples, per class (the binary default as `negative`/`positive`, other classes as `label:<name>`),
    token-length percentiles and the share truncated."""
    labels = _column(ds, "label") if "label" in ds.column_names else np.zeros(0)
    lengths = _column(ds, "n_tokens" if "n_tokens" in ds.column_names else "length")
    counts = np.bincount(labels.astype(np.int64), minlength=len(names)) if len(labels) else np.zeros(len(names))
    keys = list(names) if is_default_binary(names) else [f"label:{n}" for n in names]
    return {"examples": len(ds), **{key: int(c) for key, c in zip(keys, counts)},
            **_percentiles(lengths),
            "truncated_share": round(float(np.mean(_column(ds, "truncated"))), 4) if len(ds) else 0.0}


def _token_counts(ds: Any) -> np.ndarray:
    """Tokens per row (list lengths from the Arrow offsets; the token ids themselves are not read)."""
    import pyarrow.compute as pc

    return _rows_of(ds, pc.list_value_length(ds.data.column("input_ids")).to_numpy())


def summarize_mlm(tokens: Any, rows: Any | None) -> dict[str, Any]:
    """Texts and their token lengths, the training rows (blocks), and the share of tokens not in them."""
    lengths = _token_counts(tokens)
    total, kept = int(lengths.sum()), int(_token_counts(rows).sum()) if rows is not None else 0
    return {"texts": len(tokens), "tokens": total, "blocks": len(rows) if rows is not None else 0,
            **_percentiles(lengths), "dropped_tokens_share": round(1 - kept / total, 4) if total else 0.0}


_HEADERS = {"examples": "examples", "negative": "neg", "positive": "pos", "texts": "texts", "tokens": "tokens",
            "blocks": "blocks", "tokens_p50": "len p50", "tokens_p90": "p90", "tokens_p99": "p99",
            "tokens_max": "max", "truncated_share": "truncated", "dropped_tokens_share": "dropped"}


def format_summary(splits: dict[str, dict[str, Any]]) -> str:
    """One row per split: counts, label balance, token-length percentiles, share truncated (or dropped)."""
    columns = list(dict.fromkeys(k for row in splits.values() for k in row))
    rows = [["split"] + [_HEADERS.get(c, c.removeprefix("label:")) for c in columns]]
    for name, row in splits.items():
        rows.append([name] + [f"{row[c]:.1%}" if c.endswith("_share") else str(row[c]) if c in row else ""
                              for c in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


def build_splits(stage: str, cfg: Any, tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any], SourceReport, Any]:
    """The stage's own data (its build function, in one process), plus per-split summaries."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    names: Sequence[str] = ()
    if stage == "mlm":
        splits = dict(zip(("train", "validation"), mlm_splits(cfg, info, tokenizer)))
    elif stage == "finetune":
        train, val, names = classification_splits(cfg, info, tokenizer)
        splits = {"train": train, "validation": val}
    else:
        splits = {"test": eval_split(cfg, info, tokenizer)}
        names = cfg.label_names  # the model's classes (resolve_eval_settings)
    splits = {name: ds for name, ds in splits.items() if ds is not None}
    # The stage read the source through this cache: the table and its report come back without a re-read.
    seed = 0 if stage == "evaluate" else cfg.seed
    table, report = load_source(cfg, seed, None if stage == "mlm" else cfg.label_column)
    if stage != "mlm":
        report.label_names = list(names)  # the classes the ids stand for (a prepared table need not name them)
        return splits, {name: summarize_classification(ds, names) for name, ds in splits.items()}, report, table
    texts = dict(zip(("train", "validation"), split_validation(table, cfg.validation_split, cfg.seed)))
    summary = {name: summarize_mlm(tokenize_for_mlm(text, tokenizer, cfg.num_proc), splits.get(name))
               for name, text in texts.items() if text is not None}
    return splits, summary, report, table


def _digest(text: str) -> bytes:
    return hashlib.blake2b(clean_text(text).encode(), digest_size=16).digest()


def leakage(stage: str, cfg: Any, opts: PrepareOptions, table: Any) -> dict[str, Any] | None:
    """How many training texts (after cleaning) also occur in the evaluation text."""
    if stage == "evaluate":
        return None
    if opts.test_files:
        test_cfg = dataclasses.replace(cfg, data_files=list(opts.test_files))
    elif opts.test_split and (not cfg.data_files or (len(cfg.data_files) == 1 and (
            Path(cfg.data_files[0]).name.lower().endswith((".tar.gz", ".tgz"))
            or (Path(cfg.data_files[0]).is_dir() and aclimdb_root(Path(cfg.data_files[0])) is not None)))):
        test_cfg = dataclasses.replace(cfg, dataset_split=opts.test_split)
    else:
        return None
    # Read leniently: this is a report about the test text, not the data being prepared.
    test_cfg = dataclasses.replace(test_cfg, max_samples=0, empty_texts="drop", encoding_errors="replace")
    test, test_report = load_source(test_cfg, 0)
    # Both tables are read in batches from their memory-mapped files; the set holds 16 bytes per test text.
    seen = {_digest(t) for batch in test.iter(batch_size=CHUNK_ROWS) for t in batch["text"]}
    shared = sum(_digest(t) in seen for batch in table.iter(batch_size=CHUNK_ROWS) for t in batch["text"])
    return {"test_source": test_report.source, "test_texts": len(test), "train_texts": len(table),
            "shared_texts": shared}


def _with_sha256(entry: dict[str, Any]) -> dict[str, Any]:
    """An input file's checksum: which exact bytes this set was made from."""
    path = Path(entry.get("path", ""))
    if entry.get("bytes") is None or not path.is_file():
        return entry
    return {**entry, "sha256": hash_file(path, hashlib.sha256()).hexdigest()}


def write_atomically(out: Path, splits: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Write beside the target, then swap it in: a reader sees the old set or the new one, never half."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    moved = False
    try:
        for name, ds in splits.items():
            ds.save_to_disk(str(tmp / name))
        manifest["fingerprint"] = content_fingerprint(tmp, list(splits))
        dump_json(manifest, tmp / MANIFEST)
        if out.exists():
            out.rename(old)
            moved = True
        tmp.rename(out)
    except BaseException:
        if moved and not out.exists():
            old.rename(out)  # the previous set stays in place
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def prepare(opts: PrepareOptions, cfg: Any) -> dict[str, Any]:
    """Prepare one stage's data into cfg.output_dir; returns the manifest."""
    out = Path(cfg.output_dir)
    guard_target(out, cfg.overwrite_output_dir)  # before any work: a refusal costs nothing
    model_dir = resolve_model(cfg.model_name_or_path)
    if opts.stage == "evaluate":
        resolve_eval_settings(cfg, model_dir)
    check_length(cfg.max_seq_length, position_limit(model_dir))  # a long text would fail mid-run otherwise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if cfg.num_proc > 1 else "true")
    tokenizer = load_tokenizer(model_dir)

    started = time.perf_counter()
    splits, summary, report, table = build_splits(opts.stage, cfg, tokenizer)
    seconds = time.perf_counter() - started
    leak = leakage(opts.stage, cfg, opts, table)
    warnings = report.notes()
    if leak and leak["shared_texts"]:
        warnings.append(f"{leak['shared_texts']} of {leak['train_texts']} training texts also occur in the test "
                        f"data {leak['test_source']} (data leakage)")
    settings = stage_settings(cfg, opts.stage, tokenizer)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dapt_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "source": {"description": report.source, "inputs": [_with_sha256(i) for i in report.inputs],
                   "rows_read": report.rows_read,
                   "rows": report.rows, "dropped_empty": report.dropped_empty,
                   "replaced_bytes": report.replaced_bytes},
        "tokenizer": {"name": cfg.model_name_or_path, "path": model_dir, "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer)},
        "truncation": getattr(cfg, "truncation", None),
        "packing": settings["packing"],
        "splits": {name: summary[name] for name in splits},  # load_prepared reads these names
        **({"labels": {"names": report.label_names}} if opts.stage != "mlm" else {}),  # the classes, in id order
        "leakage": leak, "warnings": warnings,
        "config": to_dict(cfg),
        "tokenize_seconds": round(seconds, 2),
    }
    write_atomically(out, splits, manifest)
    for w in warnings:
        print(f"warning: {w}", flush=True)
    print(format_summary(summary), flush=True)
    print(f"prepared {opts.stage} data in {out} ({', '.join(f'{k}: {len(v)}' for k, v in splits.items())}; "
          f"fingerprint {manifest['fingerprint'][:12]}; {seconds:.1f}s)", flush=True)
    return manifest
