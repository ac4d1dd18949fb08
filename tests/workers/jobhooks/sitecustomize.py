"""TEST-ONLY hooks for the processes of a Slurm job (tests/test_slurm.py puts this directory first on the
job's PYTHONPATH; sbatch and srun pass it on to every task). Off unless their variable is set; product code
is not changed (cf. tests/fp16/sitecustomize.py).

DAPT_TEST_SLOW_WRITE=SECONDS   rank 0's final writes take SECONDS longer: it sleeps before each call of
    `dapt.jobs.evaluate.write_set` (the results, the model card and the W&B run of one test set) and of the
    trainer's `export_checkpoint` (the exported model; the summary and W&B follow). The other ranks must wait
    for it: under `srun --wait=N` with N < SECONDS they would otherwise exit first and srun would kill rank 0.
DAPT_TEST_TIMES_DIR=DIR        where each process records, in `DIR/<SLURM_JOB_ID>/` (one folder per job: the jobs of
    one pipeline share the environment), when it exits (`exit-<rank>-<pid>.json`, an atexit handler registered
    first, so it runs last) and rank 0 when each slow write ended (`write-<what>-<pid>.json`): a test can check
    that no rank left before rank 0 had written.
DAPT_TEST_ENV_DUMP=DIR         each srun task writes the launch-related variables it sees at start-up to
    `DIR/env-<SLURM_PROCID>.json`.

Nothing heavy is imported here: a meta-path hook patches the two modules when the job imports them.
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time

_SLOW = float(os.environ.get("DAPT_TEST_SLOW_WRITE", "0") or 0)
_TIMES = os.environ.get("DAPT_TEST_TIMES_DIR", "")
if _TIMES:
    _TIMES = os.path.join(_TIMES, os.environ.get("SLURM_JOB_ID", "nojob"))
ENV_NAMES = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "TMPDIR",
             "SLURM_PROCID", "SLURM_LOCALID", "SLURM_CPUS_PER_TASK", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID",
             "SLURM_RESTART_COUNT", "USER")


def _rank() -> str:
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "?"


def _record(name: str, data: dict) -> None:
    if not _TIMES:
        return
    os.makedirs(_TIMES, exist_ok=True)
    path = os.path.join(_TIMES, name)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _slow(what: str, real):
    def wrapper(*args, **kwargs):
        if _rank() != "0":
            return real(*args, **kwargs)
        start = time.time()
        print(f"dapt-test: rank 0 {what}: sleeping {_SLOW:g}s first", flush=True)
        time.sleep(_SLOW)
        result = real(*args, **kwargs)
        _record(f"write-{what}-{os.getpid()}.json", {"what": what, "start": start, "end": time.time()})
        print(f"dapt-test: rank 0 {what}: written", flush=True)
        return result

    return wrapper


def _patch_evaluate(module) -> None:
    module.write_set = _slow("write_set", module.write_set)


def _patch_trainer(module) -> None:
    module.export_checkpoint = _slow("export_checkpoint", module.export_checkpoint)


_PATCHES = {"dapt.jobs.evaluate": _patch_evaluate, "dapt.jobs.trainer": _patch_trainer} if _SLOW > 0 else {}
def _at_exit() -> None:
    _record(f"exit-{_rank()}-{os.getpid()}.json", {"rank": _rank(), "time": time.time()})


def _dump_env() -> None:
    folder = os.environ.get("DAPT_TEST_ENV_DUMP", "")
    if not folder or "SLURM_STEP_ID" not in os.environ:  # srun tasks only, not the batch shell's helpers
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"env-{os.environ.get('SLURM_PROCID', os.getpid())}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in ENV_NAMES}, f)


# the finder and the chaining, shared with tests/fp16/sitecustomize.py (loaded by path: no package)
_HOOKS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "site_hooks.py"))
if _PATCHES:
    sys.meta_path.insert(0, _HOOKS["PatchAfterImport"](_PATCHES))
if _TIMES and "SLURM_STEP_ID" in os.environ:
    atexit.register(_at_exit)
try:
    _dump_env()
    _HOOKS["chain_next_sitecustomize"](__file__)
except Exception as exc:  # noqa: BLE001 - never break interpreter start-up
    print(f"tests/workers/jobhooks/sitecustomize.py: {exc!r}", file=sys.stderr)
