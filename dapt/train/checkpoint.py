"""Sharded checkpoints that survive preemption, crashes and a changed world size.

Layout: `<output_dir>/checkpoints/<tag>/` holds DeepSpeed's per-rank ZeRO shards, every rank's RNG
states (`rng_rank<R>.pt`), the export metadata (`hf_meta/`) and, written last by rank 0 once every
rank has finished, `dapt_state.json` (train position plus the size of every file). Only then is
`checkpoints/latest` replaced (write to a temp file, rename), so a checkpoint interrupted mid-write is
never picked up. A checkpoint is valid when its `dapt_state.json` exists and every listed file has
its recorded size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from dapt.distributed import DistInfo, barrier
from dapt.errors import DaptError
from dapt.io import atomic_write_text, read_json

STATE_FILE = "dapt_state.json"
LATEST = "latest"
PIN_FILE = "PINNED"  # `touch checkpoints/<tag>/PINNED` keeps a checkpoint beyond keep_last


@dataclass
class TrainPosition:
    """Where training stands; with the seed this fixes the data order exactly."""

    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps already taken in this epoch
    step: int = 0  # optimizer steps taken in total
    world_size: int = 1
    effective_batch_size: int = 0
    seed: int = 0


TAG_RE = re.compile(r"step\d{7}")


def tag_for(step: int) -> str:
    return f"step{step:07d}"


# --- RNG ------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


# --- stop signals ---------------------------------------------------------------------------------

class StopFlag:
    """SIGUSR1/SIGTERM only set a flag; the loop agrees on it across ranks at a step boundary, then
    every rank saves the same step. Further signals during the save just set the flag again."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        """Put back the handlers this flag replaced (an in-process caller outlives the run)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def raised(self) -> bool:
        return self.signum is not None


# --- save -----------------------------------------------------------------------------------------

def inject(point: str, rank: int, step: int) -> None:
    """Fault injection for tests, real signals at exact places: DAPT_FAULT=point:rank:step.
    `kill`: SIGKILL this process; `signal`: send this process SIGUSR1 (as a scheduler would)."""
    spec = os.environ.get("DAPT_FAULT", "")
    if not spec:
        return
    for item in spec.split(","):
        what, _, where = item.partition("=")
        if where == f"{point}:{rank}:{step}":
            os.kill(os.getpid(), signal.SIGKILL if what == "kill" else signal.SIGUSR1)


class CheckpointManager:
    """Save, prune and restore one run's checkpoints under `root` (collective calls: every rank)."""

    def __init__(self, root: Path, info: DistInfo, keep_last: int, pinned: list[str],
                 write_meta: Callable[[Path], None]):
        self.root, self.info = root, info
        self.keep_last, self.pinned = keep_last, list(pinned)
        self.write_meta = write_meta  # rank 0 adds what export needs (config, tokenizer) to a tag

    def save(self, engine: Any, position: TrainPosition, extra: dict[str, Any] | None = None) -> Path:
        """A complete checkpoint of this step: shards and RNG states of every rank, then (rank 0) the
        export metadata, the state file (the position and `extra`, e.g. the selection state), `latest`,
        and pruning."""
        tag_dir = self.root / tag_for(position.step)
        if self.info.is_main and tag_dir.exists():  # a leftover of an interrupted save of this very step
            shutil.rmtree(tag_dir)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag_dir.name, client_state={"dapt": asdict(position)},
                               save_latest=False)
        torch.save(rng_state(), tag_dir / f"rng_rank{self.info.rank}.pt")
        inject("save", self.info.rank, position.step)  # a rank dying mid-save (tests)
        barrier()  # every rank's shards are on disk
        if self.info.is_main:
            self.write_meta(tag_dir)
            _write_state(tag_dir, asdict(position), extra)
            atomic_write_text(self.root / LATEST, tag_dir.name)
            prune(self.root, self.keep_last, self.pinned)
        barrier()
        return tag_dir

    def pin(self, tag: str) -> None:
        """Keep `tag` beyond keep_last (e.g. the best checkpoint)."""
        if tag not in self.pinned:
            self.pinned.append(tag)

    def unpin(self, tag: str) -> None:
        if tag in self.pinned:
            self.pinned.remove(tag)

    def load(self, engine: Any, tag_dir: Path, same_world: bool) -> TrainPosition:
        return load(engine, tag_dir, self.info.rank, same_world)


def _write_state(tag_dir: Path, position: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """The state file, written last: the position, `extra`, and the size of every other file of the tag."""
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != STATE_FILE}
    atomic_write_text(tag_dir / STATE_FILE, json.dumps({"position": position, **(extra or {}), "files": files},
                                                       indent=1))


def read_state(tag_dir: Path) -> dict[str, Any]:
    """A checkpoint's state file (position, selection, files); {} when there is none."""
    return read_json(tag_dir / STATE_FILE, {}) or {}


def prune(root: Path, keep_last: int, pinned: list[str]) -> list[str]:
    """Delete complete checkpoints beyond the newest `keep_last`, except pinned ones and `latest`."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name)
                  and (p / STATE_FILE).is_file())
    removed = []
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        if tag == latest or tag in pinned or (root / tag / PIN_FILE).exists():
            continue
        for path in (root / tag, root / f"{tag}.universal"):  # with its converted copy, if any
            shutil.rmtree(path, ignore_errors=True)
        removed.append(tag)
    return removed


# --- find and validate ----------------------------------------------------------------------------

def validate(tag_dir: Path) -> TrainPosition:
    """The checkpoint's position, or a one-line error naming the missing or damaged file."""
    state_path = tag_dir / STATE_FILE
    if not tag_dir.is_dir():
        raise DaptError(f"checkpoint not found: {tag_dir}")
    if not state_path.is_file():
        raise DaptError(f"checkpoint {tag_dir} is incomplete: {state_path} is missing (interrupted save?)")
    try:
        state = read_json(state_path)
        position = TrainPosition(**state["position"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DaptError(f"checkpoint state file {state_path} is unreadable: {exc}") from None
    for name, size in state["files"].items():
        path = tag_dir / name
        if not path.is_file():
            raise DaptError(f"checkpoint file missing: {path}")
        if path.stat().st_size != size:
            raise DaptError(f"checkpoint file damaged: {path} has {path.stat().st_size} bytes, expected {size}")
    return position


def find_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` -> `latest` if there is one, `never` -> None, else a path."""
    if resume == "never":
        return None
    if resume != "auto":
        p = Path(resume).expanduser()
        if (p / LATEST).is_file() or (p / "checkpoints" / LATEST).is_file():
            root = p if (p / LATEST).is_file() else p / "checkpoints"
            return _from_latest(root)
        validate(p)
        return p
    root = output_dir / "checkpoints"
    if not (root / LATEST).exists():
        return None
    return _from_latest(root)


def _from_latest(root: Path) -> Path:
    latest = root / LATEST
    tag = latest.read_text().strip()
    if not tag or "/" in tag:
        raise DaptError(f"checkpoint pointer {latest} is damaged (content {tag[:40]!r})")
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise DaptError(f"{latest} names checkpoint '{tag}', which does not exist")
    validate(tag_dir)
    return tag_dir


def load(engine: Any, tag_dir: Path, rank: int, same_world: bool) -> TrainPosition:
    """Restore model, optimizer, scheduler, loss scaler (DeepSpeed) and this rank's RNG states."""
    position = validate(tag_dir)
    try:
        path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except (RuntimeError, OSError, KeyError, EOFError, ValueError) as exc:
        raise DaptError(f"cannot load checkpoint {tag_dir}: {type(exc).__name__}: {str(exc)[:300]}") from None
    if path is None:
        raise DaptError(f"DeepSpeed found no checkpoint in {tag_dir}")
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if same_world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return position


# --- a changed world size -------------------------------------------------------------------------

def to_universal(tag_dir: Path, info: DistInfo) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (per-parameter fp32 weights and Adam
    moments), which any world size can load and re-partition. Done once by rank 0, beside the
    original as `<tag>.universal`; the original stays untouched."""
    out = tag_dir.with_name(tag_dir.name + ".universal")
    if info.is_main and not (out / STATE_FILE).is_file():
        from deepspeed.checkpoint import ds_to_universal

        tmp = tag_dir.with_name(tag_dir.name + ".universal.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        try:
            ds_to_universal.main(args)
        except Exception as exc:  # DeepSpeed raises many kinds here
            raise DaptError(f"cannot convert {tag_dir} for a new world size: {type(exc).__name__}: {exc}") from None
        state = read_json(tag_dir / STATE_FILE)
        _write_state(tmp, state["position"], {k: v for k, v in state.items() if k not in ("position", "files")})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    barrier()
    return out
