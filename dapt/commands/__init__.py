"""Thin commands: each `main(argv)` parses its arguments, calls the library and maps errors to exit codes.

    DaptError        -> `dapt: error: <one line>` on stderr, exit 2 (bad input; nothing was written)
    StopRequested    -> exit 75 (a checkpoint was saved; requeue me)
    TrainingFailed   -> `dapt: error: <one line>`, exit 3 (e.g. the FP16 loss scale hit its floor)
"""
from __future__ import annotations

import atexit
import functools
import gc
import os
import sys
from typing import Callable, TypeVar

from dapt.errors import EXIT_REQUEUE, EXIT_TRAINING_FAILED, EXIT_USAGE, DaptError, StopRequested, TrainingFailed

T = TypeVar("T")


def _report(msg: str) -> None:
    msg = " ".join(msg.split())
    # Under a multi-rank launch every rank reports; the prefix says which.
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    prefix = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
    # One write per line: ranks share the launcher's stderr, and print() writes the text and its newline
    # separately, so two ranks failing together could run their lines into one.
    sys.stderr.write(f"{prefix}dapt: error: {msg}\n")
    sys.stderr.flush()


def _wait_for_the_other_ranks() -> None:
    """The launcher kills the other ranks as soon as one exits, which can cut a slower rank's line: wait
    until every rank has reported. torch is only looked up, not imported: a training command loaded it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


_gc_off_for_imports = False


def import_without_gc() -> None:
    """Called by the entry points (dapt.cli, launch/*.py) before they import a command: no cyclic garbage
    collection while torch, DeepSpeed and transformers import. Their millions of new objects trigger one
    full collection after another, each scanning everything imported so far and finding nothing to free
    (1.1 s of GC in a one-rank run; 0.6 s with this). The command turns collection back on as it starts
    (`command`), with what was imported frozen (never scanned again)."""
    global _gc_off_for_imports
    if gc.isenabled():
        gc.disable()
        _gc_off_for_imports = True


def _imports_done() -> None:
    global _gc_off_for_imports
    if _gc_off_for_imports:
        gc.freeze()
        gc.enable()
        _gc_off_for_imports = False


def no_compiler_at_startup() -> None:
    """dapt's commands never compile (dapt refuses DeepSpeed's "compile" key), yet DeepSpeed's ZeRO optimizer
    check imports its Muon optimizer, whose torch.compile decorators import torch's compiler (inductor's
    compile_fx, ~590 modules): ~1.1 s of every rank's start-up, per job and per requeue.
    TORCHDYNAMO_DISABLE=1 makes those decorators no-ops; it reaches the processes a command starts (the
    pipeline's stages). A value the user set is kept."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def command(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command's main(): map dapt's exceptions to one line and an exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # At exit, move every object to the permanent GC generation: the interpreter's final collection
        # passes over the millions of objects torch, transformers and DeepSpeed create cost ~1 s per
        # process. Objects are still freed by reference counting and the other atexit handlers still
        # run; only garbage cycles are left for the OS to reclaim.
        atexit.unregister(gc.freeze)
        atexit.register(gc.freeze)
        _imports_done()
        no_compiler_at_startup()
        try:
            return main(*args, **kwargs)
        except DaptError as exc:
            _report(str(exc))
            sys.exit(EXIT_USAGE)
        except TrainingFailed as exc:
            _report(str(exc))
            if exc.on_every_rank:
                _wait_for_the_other_ranks()
            sys.exit(EXIT_TRAINING_FAILED)
        except StopRequested:
            sys.exit(EXIT_REQUEUE)

    return wrapper
