"""What the benchmark scripts share: the repository root on sys.path, dapt's launcher command, and
running a command with its output in a log file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # dapt from this checkout, installed or not

from dapt.jobs.pipeline import deepspeed_command  # noqa: E402,F401  (for the scripts)


def run_logged(cmd: Sequence[Any], log: Path) -> None:
    """Run `cmd` in the repository root, stdout and stderr to `log`; exit naming the log if it fails."""
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code:
        sys.exit(f"command failed ({code}); see {log}")
