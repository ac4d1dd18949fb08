#!/usr/bin/env python
"""Where the test suite's time goes: each test module's wall time and how busy the machine's cores were
meanwhile, from a per-second sampler of /proc/stat running beside pytest (in this process, the arguments
passed through). The total core-seconds of work bound the suite's wall time from below on N cores
(work / N): time spent waiting can be won back by running things side by side, work cannot.

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/suite_profile.py [--top=N] [pytest args, e.g. -q tests/]

--top=N also lists the N tests during which the machine did the most work: each test's own core-seconds
when the tests run one at a time (no -n).

Linux only (/proc/stat). Prints the table after pytest's own summary; exits with pytest's status.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from pathlib import Path

import pytest


def cpu_times() -> tuple[int, int]:
    """(total, idle) jiffies of all cores since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # idle + iowait; guest time is inside user


class Sampler(threading.Thread):
    """Busy fraction of all cores, once a second: {whole second: fraction}."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.busy: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        total, idle = cpu_times()
        while not self.stop.wait(1.0):
            t, i = cpu_times()
            if t > total:
                self.busy[int(time.time())] = 1.0 - (i - idle) / (t - total)
            total, idle = t, i


class TestTimes:
    """pytest plugin: each test's start (setup) and end (teardown)."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.spans: list[tuple[str, float, float]] = []

    def pytest_runtest_logstart(self, nodeid, location):
        self.start[nodeid] = time.time()

    def pytest_runtest_logfinish(self, nodeid, location):
        self.spans.append((nodeid, self.start.pop(nodeid, time.time()), time.time()))


def report(spans: list[tuple[str, float, float]], busy: dict[int, float], cores: int, top: int = 0) -> str:
    per = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])  # tests, wall, busy-seconds, samples
    per_test = []  # (core-seconds, wall, nodeid)
    for nodeid, a, b in spans:
        row = per[nodeid.split("::")[0]]
        samples = [busy[t] for t in range(int(a) + 1, int(b) + 1) if t in busy]
        row[0] += 1
        row[1] += b - a
        row[2] += sum(samples)
        row[3] += len(samples)
        per_test.append((cores * sum(samples), b - a, nodeid))
    lines = [f"{'module':44s} {'tests':>5s} {'wall s':>8s} {'busy':>6s} {'idle core-s':>11s}"]
    for module, (n, wall, used, samples) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        busy_frac = used / samples if samples else float("nan")
        lines.append(f"{module:44s} {n:5d} {wall:8.1f} {100 * busy_frac:5.1f}% {cores * (samples - used):11.1f}")
    if top:
        # Machine-wide while the test ran (a module fixture counts in its first test): a test's own work
        # only when tests run one at a time (no -n).
        lines.append(f"\n{'test (the machine while it ran)':100s} {'core-s':>7s} {'wall s':>7s}")
        for used, wall, nodeid in sorted(per_test, reverse=True)[:top]:
            lines.append(f"{nodeid[-100:]:100s} {used:7.1f} {wall:7.1f}")
    if busy:
        mean = sum(busy.values()) / len(busy)
        work = cores * sum(busy.values())
        lines.append(f"whole run: {len(busy)} s sampled, cores busy {100 * mean:.1f}%, {work:.0f} core-seconds of "
                     f"work ({cores} cores): at least {work / cores:.0f} s even with every core busy throughout")
    return "\n".join(lines)


def main() -> int:
    cores = os.cpu_count() or 1
    sampler, times = Sampler(), TestTimes()
    sampler.start()
    args, top = sys.argv[1:], 0
    if args and args[0].startswith("--top="):  # also list the N tests with the most core-seconds
        top, args = int(args[0].removeprefix("--top=")), args[1:]
    code = pytest.main(args, plugins=[times])
    sampler.stop.set()
    sampler.join()
    print(report(times.spans, sampler.busy, cores, top))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
