"""The console on rank 0: a tqdm bar with ETA in a terminal, plain lines (with the ETA) in a job log."""
from __future__ import annotations

import io
import math
import os
import sys
import time
from typing import Any, Mapping, TextIO

PROGRESS_MODES = ("auto", "bar", "lines")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """A tqdm bar with ETA in a terminal; plain lines (one per logging step, with the ETA) otherwise,
    so Slurm logs hold no carriage-return noise."""

    def __init__(self, total_steps: int, initial_step: int, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.total, self.start_step = total_steps, initial_step
        self.started = time.perf_counter()
        self.bar = None
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.used_bar = mode == "bar" or (mode == "auto" and isatty())
        if self.used_bar:
            from tqdm.auto import tqdm

            try:  # a terminal that reports no size (some ptys) would hide the bar
                size = os.get_terminal_size(self.stream.fileno())
                sized = size.columns > 0 and size.lines > 0
            except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                sized = False
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", file=self.stream,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
                            smoothing=0.05, desc="train")

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, record: Mapping[str, Any], line: str) -> None:
        if self.used_bar and "loss" in record:  # train records: on the bar, not above it
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                if record.get("step", 0) >= self.total:  # done: what follows (eval, export) prints below it
                    self.close()
            return
        if self.bar is None:
            if "grad_norm" in record:
                line += f" grad_norm {record['grad_norm']:.3g}"
            if "loss" in record and record.get("step", 0) < self.total:
                line += f" eta {format_duration(self.eta_seconds(record['step']))}"
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None
