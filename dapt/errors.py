"""User-facing errors: one line on stderr and a non-zero exit, never a traceback for bad input."""
from __future__ import annotations

import atexit
import functools
import gc
import os
import sys
from typing import Callable, TypeVar

EXIT_USAGE = 2  # bad input: configuration, data, paths

T = TypeVar("T")


class DaptError(Exception):
    """An error caused by the user's input; its message is shown as one line."""


def first_line(exc: BaseException) -> str:
    """A third-party exception's message cut to its first line (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cli_entry(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command's main(): DaptError -> `dapt: error: ...` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # At exit, move every object to the permanent GC generation: the interpreter's final collection
        # passes over the millions of objects torch, transformers and DeepSpeed create cost ~1 s per
        # process. Objects are still freed by reference counting and the other atexit handlers still
        # run; only garbage cycles are left for the OS to reclaim.
        atexit.unregister(gc.freeze)
        atexit.register(gc.freeze)
        try:
            return main(*args, **kwargs)
        except DaptError as exc:
            msg = " ".join(str(exc).split())
            # Under a multi-rank launch every rank reports; the prefix says which.
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
            prefix = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
            print(f"{prefix}dapt: error: {msg}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)

    return wrapper
