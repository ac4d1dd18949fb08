"""Rank discovery (dapt/distributed.py) for every way a run can be started, without starting one:
launcher variables, a bare `srun` task (also `--mpi=pmix`), OpenMPI's mpirun, and the batch shell of
an sbatch script (which sees SLURM_PROCID/SLURM_NTASKS of the job but is no step task: one rank)."""
import os

import pytest

from dapt import distributed as d
from dapt.errors import DaptError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for k in list(os.environ):
        if k in LAUNCH_VARS or k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")):
            monkeypatch.delenv(k)

    def set_(**kv):
        for k, v in kv.items():
            monkeypatch.setenv(k, str(v))
    return set_


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A `scontrol` that knows nodes n1, n2 (names that do not resolve; NodeAddr 10.1.2.3 for n1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text('#!/bin/sh\ncase "$1 $2" in\n'
                      '  "show hostnames") printf "n1.invalid\\nn2.invalid\\n" ;;\n'
                      '  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=vm" ;;\n'
                      'esac\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def launch_vars():
    return {k: os.environ.get(k) for k in LAUNCH_VARS}


def test_plain_python_in_an_sbatch_script_is_one_rank(env):
    env(SLURM_JOB_ID=12, SLURM_PROCID=0, SLURM_NTASKS=4, SLURM_LOCALID=0, SLURM_JOB_NODELIST="n[1-2]")
    assert d._single_process_env() == "single"
    v = launch_vars()
    assert (v["RANK"], v["WORLD_SIZE"], v["LOCAL_RANK"], v["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")


def test_launcher_variables_win(env):
    env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, MASTER_ADDR="h", MASTER_PORT=1, SLURM_STEP_ID=0, SLURM_PROCID=0,
        OMPI_COMM_WORLD_RANK=0)
    assert d._single_process_env() == "env" and launch_vars()["RANK"] == "3"


def test_srun_task_with_pmix(env, fake_scontrol):
    env(SLURM_JOB_ID=77, SLURM_STEP_ID=0, SLURM_PROCID=3, PMIX_RANK=3, SLURM_NTASKS=4, SLURM_STEP_NUM_TASKS=4,
        SLURM_LOCALID=1, SLURM_NODEID=1, SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_STEP_NODELIST="n[1-2]")
    assert d._single_process_env() == "srun"
    v = launch_vars()
    assert (v["RANK"], v["WORLD_SIZE"], v["LOCAL_RANK"], v["LOCAL_WORLD_SIZE"]) == ("3", "4", "1", "2")
    assert v["MASTER_ADDR"] == "10.1.2.3"  # n1 does not resolve: Slurm's NodeAddr
    port = int(v["MASTER_PORT"])
    assert 20000 <= port < 40000
    env(SLURM_STEP_ID=1)  # another step of the same job: another port
    for k in LAUNCH_VARS:
        os.environ.pop(k, None)
    d._single_process_env()
    assert int(os.environ["MASTER_PORT"]) != port


def test_one_task_srun_step_needs_no_scontrol(env):
    env(SLURM_JOB_ID=9, SLURM_STEP_ID=0, SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_STEP_NODELIST="n1", PATH="/nonexistent")
    assert d._single_process_env() == "srun"
    assert (os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("1", "127.0.0.1")


def test_srun_rank_mismatch_is_an_error(env, fake_scontrol):
    env(SLURM_JOB_ID=7, SLURM_STEP_ID=0, SLURM_PROCID=1, PMIX_RANK=0, SLURM_NTASKS=2, SLURM_STEP_NODELIST="n1")
    with pytest.raises(DaptError, match="PMIX_RANK=0 but SLURM_PROCID=1"):
        d._single_process_env()


def test_mpirun_with_a_given_rendezvous_needs_no_mpi4py(env):
    env(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_LOCAL_RANK=1, OMPI_COMM_WORLD_LOCAL_SIZE=2,
        MASTER_ADDR="10.0.0.1", MASTER_PORT=29500)
    assert d._single_process_env() == "mpirun"
    assert launch_vars() == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                             "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("spec, node, n", [("2(x3),1", 0, 2), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1), ("8", 0, 8),
                                           ("4,2(x2)", 2, 2)])
def test_tasks_per_node(spec, node, n):
    assert d._tasks_on_node(spec, node) == n
