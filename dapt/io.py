"""Files every part of dapt writes and reads: atomic writes and JSON/JSONL.

A result, a checkpoint pointer or a model card is never seen half-written: it is written to a temp
file beside the target, flushed to disk (fsync), then renamed over it (atomic on POSIX).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from dapt.errors import DaptError


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (temp file, fsync, rename); returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never share one
    try:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def dump_json(obj: Any, path: str | Path) -> Path:
    """JSON (indented, sorted keys) written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file's content; `default` when the file does not exist; a one-line error when it is broken."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise DaptError(f"{path} is not valid JSON") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped); [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise DaptError(f"{path} line {n} is not JSON") from None
    return records


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Replace `path` with these records, atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(record: dict[str, Any], path: str | Path) -> None:
    """Append one record (a log: lines are appended, never rewritten in place)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
