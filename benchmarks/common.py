"""What the benchmark scripts share: the repository root on sys.path, dapt's launcher command, running a
command with its output in a log file, and finished runs cached by what they depend on."""
from __future__ import annotations

import hashlib
import json
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


def file_digest(*files: Path) -> str:
    """sha256 of the files' bytes, in order: what a cached run's key names its data by."""
    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()


def cached_result(out: Path, key: dict) -> Any | None:
    """The result a finished run saved in `out` (save_result) if its key equals `key`, else None."""
    done = out / "result.json"
    if done.exists() and (saved := json.loads(done.read_text()))["key"] == key:
        print(f"reusing {out}", flush=True)
        return saved["result"]
    return None


def save_result(out: Path, key: dict, result: Any) -> None:
    (out / "result.json").write_text(json.dumps({"key": key, "result": result}))
