"""Cheap ranks for the tests: a process that has imported torch, transformers, DeepSpeed and dapt once, and
forks real ranks from there on request (tests/ranks.py is the client).

Each job is forked into its own session; it forks N ranks that set the launcher's environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun does) and run the stage as
`python <script> args...` or `python -m dapt args...` would, through runpy, ending with the interpreter's
normal exit (atexit handlers, thread joins, flushes). Real DeepSpeed engines, real gloo collectives, real
checkpoints: only the imports are shared. The job then behaves like a launcher: when a rank fails, the
others are stopped and the job's exit status is that rank's; SIGTERM/SIGINT/SIGUSR1 sent to the job are
passed on to the ranks.

Nothing here runs a torch op before forking: a forked child of a process whose OpenMP pool has started
can hang in its first parallel region.

    python tests/workers/rank_server.py SOCKET
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import runpy
import signal
import socket
import sys
import time
import traceback


def preload() -> None:
    # What every rank imports before its first step (~20 s per rank from scratch on 2 cores).
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (DeepSpeed's ZeRO optimizer check imports it)
    import transformers  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import dapt.cli  # noqa: F401
    for command in ("mlm", "finetune", "evaluate", "export", "prepare", "pipeline"):
        __import__(f"dapt.commands.{command}")
    for module in ("dapt.jobs.trainer", "dapt.jobs.evaluate", "dapt.jobs.prepare", "dapt.model.loading",
                   "dapt.model.export", "dapt.model.attention"):
        __import__(module)
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    # deepspeed.initialize's ZeRO optimizer check imports Muon; its torch.compile decorators are no-ops
    # under TORCHDYNAMO_DISABLE=1, which every dapt command sets (dapt.commands.no_compiler_at_startup)
    from dapt.commands import no_compiler_at_startup

    no_compiler_at_startup()
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # older DeepSpeed (constraints/lowest.txt): no Muon, nothing to preload
        pass

    # DeepSpeed's shared-memory allreduce (every multi-rank run on CPU): its JIT build check (ninja) runs
    # once here; the ranks find it in the op builders' cache of loaded ops.
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        try:
            get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
        except Exception as e:  # noqa: BLE001  (the ranks then build or load it themselves, as usual)
            print(f"warning: shared-memory allreduce not preloaded: {e}", file=sys.stderr, flush=True)


def _send(conn: socket.socket, **message) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:  # the client went away (a test timed out); the job still ends by itself
        pass


def _fork_stages(server: str) -> None:
    """In a `dapt pipeline` process: its stages run as forked ranks of this server instead of under the
    deepspeed launcher (dapt.jobs.pipeline.run_job replaced; everything else of the pipeline is real)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import dapt.jobs.pipeline as pipeline
    from ranks import ForkedJob

    from dapt.errors import DaptError

    def run_job(stage: str, ranks: int, args: list[str]) -> None:
        cmd = [*pipeline.deepspeed_command(stage, ranks), *args]
        print(f"\n==> {' '.join(cmd)}  (forked ranks: tests/ranks.py)", flush=True)
        job = ForkedJob(["-m", "dapt", stage.removesuffix(".py"), *args], pipeline.rank_env(), ranks,
                        cwd=os.getcwd(), dist=True, server=server)
        code = job.wait()
        out, err = job.output()
        sys.stdout.write(out)
        sys.stderr.write(err)
        sys.stdout.flush()
        if code:
            raise DaptError(f"dapt {stage} failed with exit code {code}")

    pipeline.run_job = run_job


def _run_site_dirs(dirs: list[str]) -> None:
    """Test hook directories first on the job's PYTHONPATH (tests/ranks.py SITE_AFTER_FORK): put them on
    sys.path where the interpreter would have, and run their sitecustomize now, with the job's environment
    (they patch the modules this server imported as well as later ones)."""
    for position, folder in enumerate(dirs, start=1):  # sys.path[0] is the script's or working directory
        sys.path.insert(position, folder)
    # the interpreter runs the first sitecustomize on sys.path (ours chain to the one they shadow)
    first = next((os.path.join(d, "sitecustomize.py") for d in dirs
                  if os.path.isfile(os.path.join(d, "sitecustomize.py"))), None)
    if first:
        spec = importlib.util.spec_from_file_location("sitecustomize", first)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


def _run_rank(request: dict, rank: int) -> int:
    """In the rank's process: become `python script args` under a launcher's environment, run, return
    the exit status the interpreter would give."""
    if request.get("fork_stages"):
        _fork_stages(request["server"])
    os.environ.clear()
    os.environ.update(request["env"])
    world = request["ranks"]
    if request["mode"] == "dist":
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(request["port"]))
    if request.get("rank_env"):
        os.environ.update(request["rank_env"][rank])
    os.chdir(request["cwd"])
    stdin = os.open(request["stdin"], os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, fd)
        os.close(out)
    if request["env"].get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True)
        sys.stderr.reconfigure(write_through=True)
    argv = request["argv"]
    try:
        _run_site_dirs(request.get("site_dirs", []))
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python script` does
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        return 1


def _job(conn: socket.socket, request: dict) -> int | None:
    """In the job's process: fork the ranks, wait like a launcher. Returns a rank number in a rank's
    process (the caller runs it), None in the job's."""
    os.setsid()  # the test can kill the job and all its ranks with one killpg
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pids: dict[int, int] = {}
    for rank in range(request["ranks"]):
        pid = os.fork()
        if pid == 0:
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
                signal.signal(s, signal.SIG_DFL)
            conn.close()
            return rank
        pids[pid] = rank
    _send(conn, job=os.getpid(), ranks=[p for p, _ in sorted(pids.items(), key=lambda kv: kv[1])])

    def forward(signum, _frame):
        for p in pids:
            try:
                os.kill(p, signum)
            except ProcessLookupError:
                pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, forward)
    status = 0
    while pids:
        try:
            pid, wait_status = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        pids.pop(pid, None)
        code = os.waitstatus_to_exitcode(wait_status)
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
        if code and not status:
            status = code
            # A launcher ends the job when one rank fails: the others would wait in a collective forever.
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    _send(conn, returncode=status)
    conn.close()
    os._exit(0)


def serve(path: str) -> tuple[dict, int] | None:
    """Accept requests forever; returns (request, rank) only in a forked rank."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # jobs are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(2)
    parent = os.getppid()
    print(f"ready {os.getpid()}", flush=True)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test session is gone (even killed): so is the server
                sys.exit(0)
            continue
        conn.settimeout(None)
        with conn.makefile("r") as f:
            line = f.readline()
        if not line:
            conn.close()
            continue
        request = json.loads(line)
        request["server"] = path
        if os.fork() == 0:
            listener.close()
            rank = _job(conn, request)
            return request, rank
        conn.close()


def main() -> None:
    started = time.time()
    gc.disable()  # as dapt's entry points import (dapt.commands.import_without_gc); frozen: the ranks share it
    preload()
    gc.freeze()
    gc.enable()
    import threading

    if threading.active_count() > 1:  # forking beside other threads could copy a held lock
        print(f"warning: {threading.active_count()} threads after preload", file=sys.stderr, flush=True)
    print(f"preloaded in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
    request, rank = serve(sys.argv[1])
    # In a rank: the normal interpreter exit from here on, as `python script` would end.
    sys.exit(_run_rank(request, rank))


if __name__ == "__main__":
    main()
