"""Rank discovery (dapt/distributed.py) for every way a run can be started, without starting one:
launcher variables, an `srun` task (slurm/launch.sh's, a bare one, `--mpi=pmix`), OpenMPI's mpirun, and
the batch shell of an sbatch script (which sees SLURM_PROCID/SLURM_NTASKS of the job but is no step task:
one rank). Also what the Slurm scripts hand over, with stand-ins for `srun`/`sbatch`/`scontrol`: no ranks
or rendezvous of their own, no launcher variables of the submitting shell (the real cluster runs are in
test_slurm.py)."""
import os
import subprocess
from pathlib import Path

import pytest

from dapt import distributed as d
from dapt.errors import DaptError

ROOT = Path(__file__).resolve().parent.parent

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")):
            monkeypatch.delenv(k)
    for k in LAUNCH_VARS:
        # dapt sets these itself (a discovered rank); set-then-delete makes monkeypatch restore them at the end,
        # also where they were absent: a test's RANK=2 must not reach the next test's error prefix
        monkeypatch.setenv(k, "")
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


def test_uneven_nodes_local_world_size_is_this_nodes_count(env, fake_scontrol):
    """3 tasks on the first node, 1 on the second: not SLURM_NTASKS_PER_NODE, and not a stale value."""
    base = dict(SLURM_JOB_ID=5, SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=4, SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=2,
                SLURM_STEP_TASKS_PER_NODE="3,1", SLURM_STEP_NODELIST="n[1-2]", LOCAL_WORLD_SIZE=2)
    env(**base, SLURM_PROCID=3, SLURM_LOCALID=0, SLURM_NODEID=1)
    assert d._single_process_env() == "srun"
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == ("3", "0", "1")
    for k in LAUNCH_VARS:
        os.environ.pop(k, None)
    env(SLURM_PROCID=2, SLURM_LOCALID=2, SLURM_NODEID=0)
    d._single_process_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == ("2", "2", "3")


def test_srun_honours_dapt_master_addr_and_port(env):
    # PATH without scontrol: the given address is used, the node list is not looked up
    env(SLURM_JOB_ID=8, SLURM_STEP_ID=0, SLURM_PROCID=1, SLURM_STEP_NUM_TASKS=2, SLURM_NTASKS=2, SLURM_LOCALID=1,
        SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="n1", DAPT_MASTER_ADDR="10.9.8.7", DAPT_MASTER_PORT=" 29501",
        PATH="/nonexistent")
    assert d._single_process_env() == "srun"
    assert launch_vars() == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                             "MASTER_ADDR": "10.9.8.7", "MASTER_PORT": "29501"}


def test_mpirun_honours_dapt_master_addr_and_port(env):
    env(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_LOCAL_RANK=0, OMPI_COMM_WORLD_LOCAL_SIZE=1,
        DAPT_MASTER_ADDR="10.0.0.2", DAPT_MASTER_PORT=29502)
    assert d._single_process_env() == "mpirun"  # both given: no mpi4py broadcast
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["LOCAL_WORLD_SIZE"]) == ("10.0.0.2", "29502", "1")


@pytest.mark.parametrize("port", ["abc", "0", "65536", "-1", "29500.0", "2 9"])
def test_bad_dapt_master_port_is_one_line(env, port):
    env(SLURM_JOB_ID=8, SLURM_STEP_ID=0, SLURM_PROCID=0, SLURM_STEP_NUM_TASKS=2, SLURM_NTASKS=2,
        SLURM_STEP_NODELIST="n1", DAPT_MASTER_ADDR="10.9.8.7", DAPT_MASTER_PORT=port)
    with pytest.raises(DaptError) as e:
        d._single_process_env()
    assert str(e.value) == f"DAPT_MASTER_PORT={port}: expected a port number (1-65535)"
    for k in LAUNCH_VARS:
        os.environ.pop(k, None)
    env(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=2)  # the same check under mpirun
    with pytest.raises(DaptError, match="expected a port number"):
        d._single_process_env()


def test_launcher_rendezvous_wins_over_dapt_master(env):
    env(SLURM_JOB_ID=8, SLURM_STEP_ID=0, SLURM_PROCID=0, SLURM_STEP_NUM_TASKS=2, SLURM_NTASKS=2, SLURM_STEP_NODELIST="n1",
        MASTER_ADDR="10.1.1.1", MASTER_PORT=1234, DAPT_MASTER_ADDR="10.9.8.7", DAPT_MASTER_PORT="bad")
    d._single_process_env()  # DAPT_MASTER_PORT is not read, so not checked
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.1.1.1", "1234")


def test_plain_python_ignores_a_stale_local_world_size(env):
    env(LOCAL_WORLD_SIZE=8)
    assert d._single_process_env() == "single" and os.environ["LOCAL_WORLD_SIZE"] == "1"


def test_rendezvous_line(env):
    env(MASTER_ADDR="127.0.0.1", MASTER_PORT=23456)
    assert d.rendezvous_line("srun", 4, "gloo") == "dapt: launcher srun: 4 ranks (gloo), master 127.0.0.1:23456"


# --- what the Slurm scripts hand over (stand-in commands, no cluster) ---------------------------------

STALE = {"RANK": "5", "WORLD_SIZE": "9", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "7", "MASTER_ADDR": "stale.host",
         "MASTER_PORT": "1", "OMPI_COMM_WORLD_RANK": "4"}


def _stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/bash\n" + body)
    (bin_dir / name).chmod(0o755)


def _script_env(tmp_path: Path, **more) -> dict[str, str]:
    # TOKENIZERS_PARALLELISM: the tokenizers library sets it in this process once an earlier test tokenised;
    # OMP_NUM_THREADS: set for pytest-xdist workers (tests/conftest.py) or by the user; the scripts' own
    # defaults are what is checked here
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "DAPT_")) and k not in ("TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")}
    env.update(STALE, PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", DAPT_VENV="none", DAPT_PYTHON="python3")
    env.update({k: str(v) for k, v in more.items()})
    return env


def test_launch_runs_python_directly_without_launcher_variables(tmp_path):
    """dapt_launch: `srun ... python SCRIPT ARGS`, nothing between srun and python, no rank or rendezvous
    variables of its own or of the submitting shell (each task derives them in dapt/distributed.py)."""
    _stub(tmp_path / "bin", "srun", f'env > {tmp_path}/task_env; printf "%s\\n" "$@" > {tmp_path}/argv; exit "$SRUN_RC"\n')
    script = f'source {ROOT}/slurm/launch.sh; dapt_init; dapt_launch launch/mlm.py --output_dir "a b"'
    proc = subprocess.run(["bash", "-c", script], env=_script_env(tmp_path, SLURM_JOB_ID=42, SLURM_JOB_NODELIST="n1",
                          SLURM_NTASKS=2, SLURM_CPUS_PER_TASK=3, SRUN_RC=0), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["--kill-on-bad-exit=0", "--wait=60", "--cpus-per-task=3", "python3", "launch/mlm.py",
                    "--output_dir", "a b"]
    task_env = dict(line.split("=", 1) for line in (tmp_path / "task_env").read_text().splitlines() if "=" in line)
    assert not set(STALE) & set(task_env), set(STALE) & set(task_env)
    assert task_env["OMP_NUM_THREADS"] == "3" and task_env["TOKENIZERS_PARALLELISM"] == "false"
    assert "dapt-slurm: job 42 () run 1 on n1: 2 tasks" in proc.stdout and "dapt-slurm: finished" in proc.stdout
    assert "master" not in proc.stdout  # the rendezvous is rank 0's to report


def test_launch_exit_75_without_requeue(tmp_path):
    _stub(tmp_path / "bin", "srun", "exit 75\n")
    proc = subprocess.run(["bash", "-c", f"source {ROOT}/slurm/launch.sh; dapt_init; dapt_launch x.py"],
                          env=_script_env(tmp_path, SLURM_JOB_ID=42, SLURM_JOB_NODELIST="n1", DAPT_REQUEUE=0),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and "DAPT_REQUEUE=0, so resubmit the same job to resume" in proc.stdout


def test_pipeline_submits_three_stages_with_the_run_layout(tmp_path):
    """slurm/pipeline.sh outside a job (launch.sh's helpers need none): <dir>/mlm -> <dir>/finetune -> <dir>/eval."""
    _stub(tmp_path / "bin", "sbatch", f'n=$(( $(cat {tmp_path}/n 2>/dev/null || echo 100) + 1 )); echo $n > {tmp_path}/n\n'
          f'echo "$n $DAPT_OUTPUT_DIR ${{DAPT_MODEL:-}} $DAPT_CONFIG $DAPT_ROOT $*" >> {tmp_path}/calls; echo "$n;dapt"\n')
    env = _script_env(tmp_path, DAPT_OUTPUT_DIR="runs/x", DAPT_CONFIG="recipes/demo.yaml", DAPT_GPUS_PER_NODE=0,
                      DAPT_MLM_ARGS="--num_epochs 1")
    proc = subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), "--time=5"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "mlm=101 finetune=102 eval=103\n"
    calls = [line.split(" ") for line in (tmp_path / "calls").read_text().splitlines()]
    out, recipe, slurm = tmp_path / "runs" / "x", str(ROOT / "recipes" / "demo.yaml"), ROOT / "slurm"
    assert calls[0] == ["101", f"{out}/mlm", "", recipe, str(ROOT), "--parsable", "--gres=none", "--time=5",
                        f"{slurm}/mlm.sh", "--num_epochs", "1"]
    assert calls[1][:5] == ["102", f"{out}/finetune", f"{out}/mlm", recipe, str(ROOT)]
    assert calls[1][5:] == ["--parsable", "--dependency=afterok:101", "--kill-on-invalid-dep=yes", "--gres=none",
                            "--time=5", f"{slurm}/finetune.sh"]
    assert calls[2][:3] == ["103", f"{out}/eval", f"{out}/finetune"] and "--dependency=afterok:102" in calls[2]
    assert (tmp_path / "logs").is_dir()


def test_pipeline_bad_config_is_one_line(tmp_path):
    _stub(tmp_path / "bin", "sbatch", "exit 1\n")
    proc = subprocess.run([str(ROOT / "slurm" / "pipeline.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env=_script_env(tmp_path, DAPT_CONFIG="recipes/nope.yaml"), timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("dapt-slurm: error: DAPT_CONFIG=recipes/nope.yaml: recipe not found: recipes/nope.yaml "
                           "(give a file, or one of the names: demo, imdb-bert-base)\n")


def _task_env(tmp_path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (tmp_path / "task_env").read_text().splitlines() if "=" in line)


def test_launch_srun_wait_and_node_local_caches(tmp_path):
    """DAPT_SRUN_WAIT sets srun's --wait; the JIT caches default to node-local, one directory per job run
    (TMPDIR, user, job id, restart count), and a user's own values are kept."""
    _stub(tmp_path / "bin", "srun", f'env > {tmp_path}/task_env; printf "%s\\n" "$@" > {tmp_path}/argv\n')
    script = f"source {ROOT}/slurm/launch.sh; dapt_init; dapt_launch x.py"
    base = _script_env(tmp_path, SLURM_JOB_ID=42, SLURM_JOB_NODELIST="n1", SLURM_RESTART_COUNT=2, TMPDIR="/local/scratch",
                       USER="alice", DAPT_SRUN_WAIT="007")
    for k in ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "OMP_NUM_THREADS"):
        base.pop(k, None)
    proc = subprocess.run(["bash", "-c", script], env=base, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "argv").read_text().splitlines()[:3] == ["--kill-on-bad-exit=0", "--wait=7", "--cpus-per-task=1"]
    task = _task_env(tmp_path)
    assert task["TORCH_EXTENSIONS_DIR"] == "/local/scratch/dapt-alice-42.2/torch_extensions"
    assert task["TRITON_CACHE_DIR"] == "/local/scratch/dapt-alice-42.2/triton"
    assert task["OMP_NUM_THREADS"] == "1"
    assert "JIT build caches: TORCH_EXTENSIONS_DIR=/local/scratch/dapt-alice-42.2/torch_extensions" in proc.stdout
    mine = {**base, "TORCH_EXTENSIONS_DIR": "/shared/prebuilt", "TRITON_CACHE_DIR": "/nvme/triton", "OMP_NUM_THREADS": "5",
            "DAPT_SRUN_WAIT": "0"}
    proc = subprocess.run(["bash", "-c", script], env=mine, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--wait=0" in (tmp_path / "argv").read_text().splitlines()  # srun: no limit
    task = _task_env(tmp_path)
    assert (task["TORCH_EXTENSIONS_DIR"], task["TRITON_CACHE_DIR"], task["OMP_NUM_THREADS"]) == \
           ("/shared/prebuilt", "/nvme/triton", "5")


@pytest.mark.parametrize("slurm, error", [
    ({"SLURM_GPUS_ON_NODE": 8, "SLURM_NTASKS_PER_NODE": 8}, None),
    ({"SLURM_GPUS_ON_NODE": 8, "SLURM_NTASKS_PER_NODE": 8, "SLURM_GPUS_PER_TASK": 1}, None),  # per-task binding
    ({"SLURM_GPUS_ON_NODE": 8, "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_PER_TASK": "h100:1"}, None),
    ({"SLURM_GPUS_ON_NODE": 8, "SLURM_TASKS_PER_NODE": "4(x2)"},
     "8 GPUs per node but 4 tasks per node: run one task per GPU (sbatch --ntasks-per-node=8, or --gpus-per-task=1 "
     "--ntasks-per-node=<GPUs per node>)"),
    ({"SLURM_GPUS_ON_NODE": 8, "SLURM_NTASKS_PER_NODE": 4, "SLURM_GPUS_PER_TASK": 2},
     "--gpus-per-task=2: each rank uses one GPU; use --gpus-per-task=1 (or --gres=gpu:N --ntasks-per-node=N)"),
    ({"DAPT_SRUN_WAIT": "1m"}, "DAPT_SRUN_WAIT=1m: expected seconds (srun --wait; 0 = no limit)"),
])
def test_launch_gpu_layout_and_srun_wait_checks(tmp_path, slurm, error):
    """One rank per GPU whether every task sees all GPUs or only its own (--gpus-per-task=1): the node's
    GPUs must equal its tasks; anything else is one line, exit 2, before srun."""
    _stub(tmp_path / "bin", "srun", f"touch {tmp_path}/ran\n")
    proc = subprocess.run(["bash", "-c", f"source {ROOT}/slurm/launch.sh; dapt_init; dapt_launch x.py"],
                          env=_script_env(tmp_path, SLURM_JOB_ID=42, SLURM_JOB_NODELIST="n1", **slurm),
                          capture_output=True, text=True, timeout=60)
    if error is None:
        assert proc.returncode == 0 and (tmp_path / "ran").exists(), proc.stderr
    else:
        assert (proc.returncode, proc.stderr) == (2, f"dapt-slurm: error: {error}\n")
        assert not (tmp_path / "ran").exists()


# --- slurm/hostfile.sh: the hostfile and the DeepSpeed env file (stand-in scontrol) --------------------

MARK = "DAPT_DS_ENV_WRITTEN_BY=slurm/hostfile.sh"


def _hostfile(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    _stub(tmp_path / "bin", "scontrol", 'printf "n1\\nn2\\n"\n')
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(home), "USER": "alice", "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "64",
            "SLURM_GPUS_ON_NODE": "8", "TMPDIR": "/local"}
    return subprocess.run(["bash", str(ROOT / "slurm" / "hostfile.sh"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**base, **{k: str(v) for k, v in env.items()}})


def _env_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_hostfile_writes_the_deepspeed_env_file(tmp_path):
    """What the ranks on other nodes need and the launcher would not forward: HF_*, WANDB_*, DAPT_*, threads,
    node-local caches, PATH; not the scripts' own words, not secrets (they would be on the launcher's command
    line), not values DeepSpeed cannot pass intact through every launcher. Mode 600; stdout stays the
    hostfile's path."""
    hosts = tmp_path / "hosts"
    proc = _hostfile(tmp_path, str(hosts), HF_HOME="/shared/hf", HF_HUB_OFFLINE=1, HF_TOKEN="hf_secret",
                     WANDB_MODE="offline", WANDB_API_KEY="k", WANDB_NOTES="two words", DAPT_DIST_TIMEOUT_MINUTES=90,
                     DAPT_ENV_SETUP="module load cuda", TRANSFORMERS_OFFLINE=1, TOKENIZERS_PARALLELISM="false",
                     VIRTUAL_ENV="/home/alice/venv", UNRELATED="x", DAPT_DS_ENV_VARS="MY_* NCCL_SOCKET_IFNAME",
                     MY_SETTING="on", NCCL_SOCKET_IFNAME="ib0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{hosts}\n"
    assert hosts.read_text() == "n1 slots=8\nn2 slots=8\n"
    env_file = tmp_path / "hosts.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    lines = _env_lines(env_file)
    assert lines[0] == MARK
    assert sorted(lines[1:]) == sorted([
        "HF_HOME=/shared/hf", "HF_HUB_OFFLINE=1", "WANDB_MODE=offline", "DAPT_DIST_TIMEOUT_MINUTES=90",
        "TRANSFORMERS_OFFLINE=1", "TOKENIZERS_PARALLELISM=false", "VIRTUAL_ENV=/home/alice/venv",
        "MY_SETTING=on", "NCCL_SOCKET_IFNAME=ib0", f"PATH={tmp_path / 'bin'}:/usr/bin:/bin",
        "OMP_NUM_THREADS=8",  # 64 CPUs on the node / 8 slots, as srun gives each task its CPUs
        "TORCH_EXTENSIONS_DIR=/local/dapt-alice-7.0/torch_extensions", "TRITON_CACHE_DIR=/local/dapt-alice-7.0/triton"])
    err = proc.stderr
    assert "left out (secrets would show on the launcher's command line): HF_TOKEN WANDB_API_KEY" in err
    assert "left out (spaces or shell characters do not survive every launcher): WANDB_NOTES" in err
    assert f"DS_ENV_FILE={env_file} deepspeed --hostfile {hosts} ..." in err
    # a secret named on purpose is sent; the file is ours, so a second run replaces it
    proc = _hostfile(tmp_path, str(hosts), HF_TOKEN="hf_secret", DAPT_DS_ENV_VARS="HF_TOKEN", OMP_NUM_THREADS=3)
    assert proc.returncode == 0, proc.stderr
    assert {"HF_TOKEN=hf_secret", "OMP_NUM_THREADS=3"} <= set(_env_lines(env_file))


def test_hostfile_keeps_the_users_deepspeed_env(tmp_path):
    """~/.deepspeed_env and ./.deepspeed_env are never modified; their lines come first in the new file (DeepSpeed
    reads only DS_ENV_FILE then) and win over the job's values. A file at DAPT_DS_ENV_FILE that hostfile.sh did not
    write is refused before anything is written; "none" writes no env file."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_IB_HCA=mlx5_0\nHF_HOME=/theirs\n")
    (tmp_path / ".deepspeed_env").write_text("WANDB_PROJECT=p1\n")
    before = {p: p.read_text() for p in (home / ".deepspeed_env", tmp_path / ".deepspeed_env")}
    proc = _hostfile(tmp_path, "hosts", HF_HOME="/mine", WANDB_PROJECT="p2", HF_HUB_OFFLINE=1)
    assert proc.returncode == 0, proc.stderr
    lines = _env_lines(tmp_path / "hosts.env")
    assert lines[:4] == [MARK, "NCCL_IB_HCA=mlx5_0", "HF_HOME=/theirs", "WANDB_PROJECT=p1"]
    assert "HF_HUB_OFFLINE=1" in lines and "HF_HOME=/mine" not in lines and "WANDB_PROJECT=p2" not in lines
    assert "yours win: HF_HOME WANDB_PROJECT" in proc.stderr
    assert {p: p.read_text() for p in before} == before

    (tmp_path / "hosts").unlink()
    proc = _hostfile(tmp_path, "hosts", DAPT_DS_ENV_FILE=str(home / ".deepspeed_env"))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"dapt-slurm: error: DAPT_DS_ENV_FILE={home / '.deepspeed_env'} exists and was not written "
                           "by slurm/hostfile.sh: not overwriting it (name another file, or move yours)\n")
    assert not (tmp_path / "hosts").exists() and {p: p.read_text() for p in before} == before

    (tmp_path / "hosts.env").unlink()
    proc = _hostfile(tmp_path, "hosts", DAPT_DS_ENV_FILE="none")
    assert proc.returncode == 0 and proc.stdout == "hosts\n" and proc.stderr == ""
    assert (tmp_path / "hosts").is_file() and not (tmp_path / "hosts.env").exists()
