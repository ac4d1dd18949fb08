"""Cheap ranks: start N real ranks of a stage without paying ~20 s of imports per rank and ~6 s of launcher.

A rank server (tests/workers/rank_server.py) imports torch, transformers, DeepSpeed and dapt once per
session and forks each job's ranks from there; the ranks get the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT, as torchrun sets it) and run `python launch/<stage>.py args` through runpy.
The engines, the gloo collectives, the checkpoints and the signals are real; only start-up is shared.
Tests about a launcher itself (`deepspeed`, `torchrun`, `srun`, `mpirun`) start that launcher instead.

Values that libraries read once at import (PYTHONPATH and its sitecustomize, HF caches and offline flags,
OMP threads, ...) are fixed in a server, so each distinct set of them gets its own server. The exception is a
test hook directory of SITE_AFTER_FORK first on PYTHONPATH (the FP16 lane's tests/fp16): its sitecustomize
patches modules already imported as well as later ones, so a rank forked from the plain server runs it after
the fork, with the job's environment, instead of a server of its own.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from dapt.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tests" / "workers" / "rank_server.py"
# Read once when a library is imported (or by the interpreter at start-up): a rank forked from a server
# sees the server's values, so a request must match them.
IMPORT_TIME = ("PYTHONPATH", "PYTHONHASHSEED", "HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE",
               "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
               "TRANSFORMERS_VERBOSITY", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "TORCH_EXTENSIONS_DIR",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# sitecustomize directories a forked rank can run after the fork (they patch already-imported modules too)
SITE_AFTER_FORK = (str(ROOT / "tests" / "fp16"),)

_servers: dict[tuple, tuple[subprocess.Popen, str]] = {}
_scratch_dirs: dict[int, Path] = {}  # pid -> this process's scratch (sockets, server logs, jobs' output)


def _scratch() -> Path:
    if os.getpid() not in _scratch_dirs:
        _scratch_dirs[os.getpid()] = Path(tempfile.mkdtemp(prefix="dapt-ranks-"))
    return _scratch_dirs[os.getpid()]


def _split_site_dirs(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The leading SITE_AFTER_FORK entries of PYTHONPATH, and the environment without them (the server's)."""
    entries = env.get("PYTHONPATH", "").split(os.pathsep) if env.get("PYTHONPATH") else []
    site = []
    while entries and entries[0] in SITE_AFTER_FORK:
        site.append(entries.pop(0))
    if not site:
        return [], env
    rest = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    if entries:
        rest["PYTHONPATH"] = os.pathsep.join(entries)
    return site, rest


def _key(env: dict[str, str]) -> tuple:
    # TRANSFORMERS_OFFLINE is read only by huggingface_hub, as HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE (the
    # first non-empty): key on that value, so HF_HUB_OFFLINE=1 with or without it shares a server
    hub_offline = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")
    return (*(env.get(k) for k in IMPORT_TIME if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")), hub_offline)


def _server(env: dict[str, str]) -> str:
    """The socket of a server started with this environment's import-time values (started on first use).
    `env` is the server's (without SITE_AFTER_FORK entries: _split_site_dirs)."""
    key = _key(env)
    if key in _servers and _servers[key][0].poll() is None:
        return _servers[key][1]
    sock = str(_scratch() / f"server{len(_servers)}.sock")
    log = open(_scratch() / f"server{len(_servers)}.log", "w")
    proc = subprocess.Popen([sys.executable, str(SERVER), sock], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=log, text=True, start_new_session=True)
    line = proc.stdout.readline()
    while line and not line.startswith("ready"):  # libraries may print while they are imported
        line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise RuntimeError(f"rank server did not start: {Path(log.name).read_text()[-3000:]}")
    _servers[key] = (proc, sock)
    return sock


@atexit.register
def stop_servers() -> None:
    """The servers (and any job still running) and this process's scratch go when the session ends."""
    for proc, _ in _servers.values():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    _servers.clear()
    if os.getpid() in _scratch_dirs:
        shutil.rmtree(_scratch_dirs.pop(os.getpid()), ignore_errors=True)


class ForkedJob:
    """A running job of forked ranks, used like subprocess.Popen: poll, wait, communicate, send_signal,
    kill; `pid` is the job (the launcher's place: signals sent to it reach every rank), `rank_pids` the
    ranks in rank order."""

    def __init__(self, argv: list[str], env: dict[str, str], ranks: int, cwd: Path | str = ROOT,
                 dist: bool | None = None, stdin: str | None = None, fork_stages: bool = False,
                 server: str | None = None, rank_env: list[dict[str, str]] | None = None):
        self.args = list(argv)
        fd, stdin_path = tempfile.mkstemp(prefix="stdin-", dir=_scratch())
        os.write(fd, (stdin or "").encode())
        os.close(fd)
        fd, self._stdout = tempfile.mkstemp(prefix="stdout-", dir=_scratch())
        os.close(fd)
        fd, self._stderr = tempfile.mkstemp(prefix="stderr-", dir=_scratch())
        os.close(fd)
        site_dirs, server_env = _split_site_dirs(env)
        request = dict(argv=self.args, env=dict(env), ranks=ranks, cwd=str(cwd), stdin=stdin_path, stdout=self._stdout,
                       stderr=self._stderr, mode="dist" if (ranks > 1 if dist is None else dist) else "python",
                       port=free_port(), fork_stages=fork_stages, site_dirs=site_dirs, rank_env=rank_env or [])
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(server or _server(server_env))
        self._conn.sendall((json.dumps(request) + "\n").encode())
        self._reader = self._conn.makefile("r")
        started = json.loads(self._reader.readline())
        self.pid: int = started["job"]
        self.rank_pids: list[int] = started["ranks"]
        self.returncode: int | None = None

    def _read_status(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        # select, then read: a timed-out read would leave the socket's file object unusable
        if not select.select([self._conn], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(self.args, timeout)
        line = self._reader.readline()  # the job writes its status as one line, then closes
        if not line:  # the job process itself was killed: no launcher status to report
            self.returncode = -signal.SIGKILL
        else:
            self.returncode = json.loads(line)["returncode"]
        self._reader.close()
        self._conn.close()

    def poll(self) -> int | None:
        try:
            self._read_status(0)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read_status(timeout)
        return self.returncode

    def output(self) -> tuple[str, str]:
        return (Path(self._stdout).read_text(errors="replace"), Path(self._stderr).read_text(errors="replace"))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait(30)
            raise
        return self.output()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """The job and every rank (one process group), as a timeout kills a launcher's session."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(argv: list[str], env: dict[str, str], ranks: int = 1, cwd: Path | str = ROOT,
        timeout: float = 300, dist: bool | None = None, stdin: str | None = None,
        fork_stages: bool = False, rank_env: list[dict[str, str]] | None = None) -> subprocess.CompletedProcess:
    """Run a job of forked ranks to its end: `argv` as after `python` (a script and its arguments, or
    `-m module ...`); 1 rank runs as plain `python` (no launcher environment) unless dist=True. Every
    rank reads `stdin` (empty if None). fork_stages: a `dapt pipeline` whose stages are forked ranks too,
    instead of deepspeed launches. rank_env: each rank's own variables, set over the launcher's (e.g.
    LOCAL_RANK 0 on every rank: one rank per node); the server's imports read `env`, so a rank that needs
    an import-time value of its own re-reads it."""
    job = ForkedJob(argv, env, ranks, cwd, dist, stdin, fork_stages, rank_env=rank_env)
    stdout, stderr = job.communicate(timeout=timeout)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
