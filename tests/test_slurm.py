"""The Slurm scripts, the deepspeed hostfile helper and MPI launches, on a real Slurm cluster.

`.ci/cluster.sh` (the project's own script) installs Slurm, munge and OpenMPI from Debian packages
and brings up a one-node cluster on this machine (and a two-"node" one, several slurmd on one host);
the session fixture starts it and stops it at the end, by pid. Jobs run the real `slurm/*.sh` with
the tiny model on CPU (`--gres=none`, the CPU mode) and write under the test's tmp dir (logs/ too).

Where Slurm is missing and cannot be installed (not root, no apt-get) the tests skip, saying so;
with DAPT_REQUIRE_CLUSTER=1 (.ci/run) they fail instead."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, free_port

CLUSTER = ROOT / ".ci" / "cluster.sh"
SLURM = ROOT / "slurm"
TOOLS = ("sbatch", "scontrol", "slurmctld", "slurmd", "munged", "mpirun")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
CPU_MODE = ["--gres=none", "--cpus-per-task=1"]  # the same scripts on a CPU-only cluster
EPOCHS = 4  # long enough to be interrupted twice, short enough for CI (9 optimizer steps per epoch)


def _unavailable(reason: str) -> None:
    if os.environ.get("DAPT_REQUIRE_CLUSTER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _ensure_installed() -> None:
    if all(shutil.which(t) for t in TOOLS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _unavailable("Slurm/munge/OpenMPI are not installed and cannot be installed here (needs root and "
                     "apt-get); run `.ci/cluster.sh install` as root")
    proc = subprocess.run([str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        _unavailable(f".ci/cluster.sh install failed: {proc.stderr.strip()[-500:]}")


class Cluster:
    """The running cluster: 1 node (this host) or 2 nodes (n1, n2) on this host."""

    def __init__(self) -> None:
        self.nodes = 0

    def ensure(self, nodes: int) -> None:
        if self.nodes == nodes:
            return
        proc = subprocess.run([str(CLUSTER), "up" if nodes == 1 else "up2"], capture_output=True, text=True,
                              timeout=180)
        if proc.returncode:
            _unavailable(f"cluster bring-up failed: {proc.stderr.strip()[-800:]}")
        self.nodes = nodes

    def stop(self) -> None:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)
        self.nodes = 0


@pytest.fixture(scope="session")
def cluster():
    _ensure_installed()
    c = Cluster()
    try:
        c.ensure(1)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def mpi_ready():
    _ensure_installed()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        _unavailable("mpi4py is not installed (pip install 'dapt[mpi]'; `make venv` does)")


def job_env(base_env, **dapt) -> dict[str, str]:
    """The submitting environment (sbatch exports it to the job), without a surrounding job's SLURM_*."""
    env = {k: v for k, v in base_env.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update({k: str(v) for k, v in dapt.items()})
    return env


def sbatch(args, cwd: Path, env) -> int:
    (cwd / "logs").mkdir(exist_ok=True)
    proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def job_info(job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)


def log_of(job: int) -> str:
    path = job_info(job).get("StdOut", "")
    return Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""


def wait_job(job: int, timeout: float) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    log = log_of(job)
    subprocess.run(["scancel", str(job)], timeout=30)
    raise AssertionError(f"job {job} not finished after {timeout:.0f}s\n{log[-4000:]}")


def assert_completed(job: int, timeout: float = 240) -> str:
    info = wait_job(job, timeout)
    log = log_of(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info['JobState']} {info['ExitCode']}\n{log[-5000:]}"
    return log


def stage_flags(stage: str, demo_files, epochs: int) -> list[str]:
    """A stage's flags in the Slurm tests, without --output_dir (slurm/pipeline.sh gives each stage its own)."""
    data = {"mlm": "unlabelled", "finetune": "train"}[stage]
    args = ["--data_files", demo_files[data], "--max_seq_length", 64, "--num_epochs", epochs, "--learning_rate", "1e-3",
            "--warmup", "0.1", "--validation_split", "0.1", "--effective_batch_size", 16, "--micro_batch_size", 4,
            "--logging_steps", 1, "--seed", 3, "--save_steps", 0]
    if stage == "finetune":
        args += ["--head_tokens", 16]
    return [str(a) for a in args]


def stage_args(stage: str, out: Path, demo_files, epochs: int) -> list[str]:
    return ["--output_dir", str(out), *stage_flags(stage, demo_files, epochs)]


def prebuilt_extensions() -> str:
    """Where this machine's DeepSpeed JIT ops are built (torch's default, where .ci/run pre-builds them). The
    jobs are given it as a TORCH_EXTENSIONS_DIR of the user's, which slurm/launch.sh keeps: its own default
    is a fresh node-local directory per job run, where every job would rebuild the op (30-90 s here)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")  # as torch names it
    version = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{version}_{accelerator}")


def tiny_env(base_env, tiny_model, **more):
    # This interpreter and this PATH, not the activated venv: its pip `ninja` (1.13) and Debian's (1.11)
    # hash build commands differently, so alternating them rebuilds DeepSpeed's JIT op (30-90 s) each run.
    return job_env(base_env, **{"DAPT_CONFIG": "", "DAPT_DS_CONFIG": "ds_configs/zero2_auto.json", "DAPT_MODEL": tiny_model,
                                "DAPT_VENV": "none", "DAPT_PYTHON": sys.executable,
                                "TORCH_EXTENSIONS_DIR": prebuilt_extensions(), **more})


def steps_and_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def max_step(out: Path) -> int:
    try:
        return max(steps_and_losses(out), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def wait_for_step(out: Path, step: int, job: int, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (now := max_step(out)) >= step:
            return now
        assert job_info(job).get("JobState") not in TERMINAL, f"job ended before step {step}\n{log_of(job)[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout}s\n{log_of(job)[-3000:]}")


def world_size(out: Path) -> int:
    return json.loads((out / "run_config.json").read_text())["world_size"]


def rendezvous_lines(log: str) -> list[str]:
    """Rank 0's line from dapt/distributed.py (the scripts compute no rendezvous of their own)."""
    return [ln for ln in log.splitlines() if ln.startswith("dapt: launcher ")]


# what a submitting shell may have exported (sbatch passes it on): must not reach the tasks
STALE_LAUNCH_VARS = {"RANK": "5", "WORLD_SIZE": "9", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "7",
                     "MASTER_ADDR": "stale.invalid", "MASTER_PORT": "1"}


# --- one node ---------------------------------------------------------------------------------------

HOOKS = ROOT / "tests" / "workers" / "jobhooks"  # test-only sitecustomize: slow rank-0 writes, exit times, env dumps
SLOW_WRITE = 6  # seconds rank 0's final writes take longer in the pipeline's jobs; srun's --wait there is 3


def hooked(env: dict[str, str], **hooks) -> dict[str, str]:
    """A job environment with tests/workers/jobhooks first on the tasks' PYTHONPATH and its variables set."""
    return {**env, "PYTHONPATH": f"{HOOKS}{os.pathsep}{env.get('PYTHONPATH', ROOT)}", **{k: str(v) for k, v in hooks.items()}}


@pytest.fixture(scope="module")
def pipeline_run(cluster, tmp_path_factory, tiny_model, demo_files, base_env):
    """`slurm/pipeline.sh` with 2 tasks a job: MLM -> fine-tune -> eval, three dependent jobs, run once for
    several tests' checks. Submitted from a shell that exported stale launcher variables; a given rendezvous
    (DAPT_MASTER_ADDR/PORT); the MLM job runs EPOCHS epochs uninterrupted (the reference of the requeue
    test); every job runs under `srun --wait=3` (DAPT_SRUN_WAIT) while rank 0's final writes take SLOW_WRITE
    seconds longer (tests/workers/jobhooks: the trainer's model export, the evaluation's results + model card
    + W&B run), and each task records when it exited."""
    cluster.ensure(1)
    work = tmp_path_factory.mktemp("slurm_pipeline")
    out, times = work / "pipe", work / "times"
    port = free_port()
    ft_flags = [*stage_flags("finetune", demo_files, 1), "--max_samples", "64"]
    env = hooked(tiny_env(base_env, tiny_model, DAPT_OUTPUT_DIR=out, DAPT_GPUS_PER_NODE=0, DAPT_SRUN_WAIT=3,
                          DAPT_MASTER_ADDR="127.0.0.1", DAPT_MASTER_PORT=port,
                          DAPT_MLM_ARGS=" ".join(stage_flags("mlm", demo_files, EPOCHS)),
                          DAPT_FINETUNE_ARGS=" ".join(ft_flags), DAPT_EVAL_ARGS=f"--data_files {demo_files['test']}",
                          **STALE_LAUNCH_VARS),
                 DAPT_TEST_SLOW_WRITE=SLOW_WRITE, DAPT_TEST_TIMES_DIR=times)
    start = time.time()
    proc = subprocess.run([str(SLURM / "pipeline.sh"), "--ntasks-per-node=2", "--cpus-per-task=1"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jobs = {k: int(v) for k, v in (kv.split("=") for kv in proc.stdout.split())}
    assert list(jobs) == ["mlm", "finetune", "eval"]
    dependency = job_info(jobs["finetune"])["Dependency"]
    logs = {stage: assert_completed(job, timeout=300) for stage, job in jobs.items()}
    return {"jobs": jobs, "logs": logs, "out": out, "work": work, "times": times, "port": port,
            "dependency": dependency, "seconds": time.time() - start}


@pytest.mark.slurm
def test_sbatch_mlm_two_tasks(pipeline_run):
    """The pipeline's MLM job: `sbatch slurm/mlm.sh` with 2 tasks, from a shell with stale launcher variables."""
    job, log = pipeline_run["jobs"]["mlm"], pipeline_run["logs"]["mlm"]
    out = pipeline_run["out"] / "mlm"
    assert (pipeline_run["work"] / "logs" / f"dapt-mlm-{job}.out").is_file()  # #SBATCH --output=logs/%x-%j.out
    assert f"dapt-slurm: job {job} (dapt-mlm) run 1 on " in log and "2 tasks" in log
    # python is the srun task itself (no shell around it); ranks and rendezvous come from dapt/distributed.py
    assert re.search(r"dapt-slurm: running: srun --kill-on-bad-exit=0 --wait=3 --cpus-per-task=1 \S+ -m dapt mlm ", log)
    lines = rendezvous_lines(log)
    assert lines == [f"dapt: launcher srun: 2 ranks (gloo), master 127.0.0.1:{pipeline_run['port']}"], lines
    assert "stale.invalid" not in log
    assert "dapt-slurm: finished" in log
    assert world_size(out) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 9 * EPOCHS and summary["world_size"] == 2
    assert sorted(steps_and_losses(out)) == list(range(1, 9 * EPOCHS + 1))
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    print(f"sbatch slurm/mlm.sh, 2 tasks: {summary['steps']} steps")


@pytest.mark.slurm
def test_requeue_resumes_to_the_same_run(cluster, pipeline_run, tmp_path, tiny_model, demo_files, base_env):
    """A USR1 to the batch shell (as `--signal=B:USR1@grace` sends it), then `scontrol requeue` (SIGTERM):
    each time the tasks checkpoint and exit 75, the job is requeued, and the next run resumes; the losses
    are the pipeline's uninterrupted MLM job's (the same flags)."""
    cluster.ensure(1)
    start = time.time()
    out = tmp_path / "mlm"
    job = sbatch([*CPU_MODE, "--ntasks-per-node=2", SLURM / "mlm.sh", *stage_args("mlm", out, demo_files, EPOCHS)],
                 tmp_path, tiny_env(base_env, tiny_model))
    wait_for_step(out, 3, job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, timeout=30)
    # the second run: requeued by the job itself, resumed; interrupt it with a requeue from outside
    deadline = time.time() + 180
    while "run 2 on" not in log_of(job):
        assert time.time() < deadline and job_info(job).get("JobState") not in TERMINAL, log_of(job)[-4000:]
        time.sleep(0.5)
    first_stop = int(re.findall(r"stopped by signal \d+ at step (\d+)", log_of(job))[0])
    wait_for_step(out, first_stop + 3, job)
    subprocess.run(["scontrol", "requeue", str(job)], check=True, timeout=30)
    log = assert_completed(job, timeout=300)

    info = job_info(job)
    assert info["Restarts"] == "2", info
    stops = [(int(s), int(n)) for s, n in re.findall(r"stopped by signal (\d+) at step (\d+)", log)]
    assert len(stops) == 2 and stops[0][0] == signal.SIGUSR1 and stops[1][0] in (signal.SIGUSR1, signal.SIGTERM), stops
    assert "got SIGUSR1: forwarding SIGUSR1 to the tasks" in log and "got SIGTERM: forwarding" in log
    assert f"requeueing job {job}" in log and "run 3 on" in log
    for _, step in stops:
        assert re.search(rf"resumed from \S*step{step:07d} at step {step}\b", log), step
    ref = steps_and_losses(pipeline_run["out"] / "mlm")
    losses = steps_and_losses(out)
    assert sorted(losses) == sorted(ref) == list(range(1, 9 * EPOCHS + 1))
    assert json.loads((out / "summary.json").read_text())["steps"] == max(ref)
    worst = max(abs(losses[s] - ref[s]) for s in ref)
    assert worst <= 1e-6, worst
    print(f"requeue: stops at {stops}, {max(losses)} steps like the uninterrupted run "
          f"(max |loss diff| {worst:.1e}), {time.time() - start:.0f}s")


@pytest.mark.slurm
def test_pipeline_three_dependent_jobs(pipeline_run, demo_files, base_env):
    jobs, logs, out = pipeline_run["jobs"], pipeline_run["logs"], pipeline_run["out"]
    assert pipeline_run["dependency"] in (f"afterok:{jobs['mlm']}(unfulfilled)", "(null)")
    info = {k: job_info(v) for k, v in jobs.items()}
    assert info["finetune"]["StartTime"] >= info["mlm"]["EndTime"]  # afterok: one after the other
    assert info["eval"]["StartTime"] >= info["finetune"]["EndTime"]
    results = json.loads((out / "eval" / "eval_results.json").read_text())
    n_test = sum(1 for line in Path(demo_files["test"]).read_text().splitlines() if line.strip())
    assert results["n_examples"] == n_test == 37
    assert world_size(out / "finetune") == 2
    assert f"--model_name_or_path {out / 'mlm'}" in logs["finetune"]
    assert f"--model_name_or_path {out / 'finetune'}" in logs["eval"]
    for stage in ("mlm", "finetune"):
        assert rendezvous_lines(logs[stage]) == [f"dapt: launcher srun: 2 ranks (gloo), master 127.0.0.1:{pipeline_run['port']}"]
    # the Slurm pipeline's directory is the same run layout as launch/pipeline.py's: dapt report reads it
    report = subprocess.run([sys.executable, "-m", "dapt", "report", str(out)], cwd=ROOT, env=base_env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (out / "report" / "confusion_matrix.png").is_file()
    md = (out / "report" / "report.md").read_text()
    assert f"| accuracy | {results['accuracy']:.4f} [" in md and "## mlm" in md and "## finetune" in md
    print(f"pipeline: jobs {jobs}, {results['n_examples']} examples evaluated, {pipeline_run['seconds']:.0f}s")


def exit_and_write_times(folder: Path) -> tuple[dict[str, float], list[float]]:
    exits = {}
    for path in folder.glob("exit-*.json"):
        record = json.loads(path.read_text())
        exits[record["rank"]] = record["time"]
    writes = [json.loads(p.read_text())["end"] for p in folder.glob("write-*.json")]
    return exits, writes


@pytest.mark.slurm
def test_ranks_wait_for_rank0_final_writes_under_srun_wait(pipeline_run):
    """`srun --wait=3` (DAPT_SRUN_WAIT=3) kills the tasks still running 3 s after the first one exits, and rank
    0's final writes take SLOW_WRITE (6) s longer in the pipeline's jobs (tests/workers/jobhooks: the MLM's and the
    fine-tune's model export, the evaluation's results + model card + W&B run), 2 tasks each: every rank
    stays until rank 0 has written (the trainer's closing barrier, evaluate's end barrier), so nothing is
    killed, the three jobs exit 0 and the files exist. Without the barrier at the end of evaluate, rank 1
    exits first and srun kills rank 0 mid-write: the eval job fails with no results."""
    jobs, logs, out = pipeline_run["jobs"], pipeline_run["logs"], pipeline_run["out"]
    for stage, what in (("mlm", "export_checkpoint"), ("finetune", "export_checkpoint"), ("eval", "write_set")):
        log = logs[stage]
        assert "dapt-slurm: running: srun --kill-on-bad-exit=0 --wait=3 --cpus-per-task=1 " in log
        assert f"dapt-test: rank 0 {what}: sleeping {SLOW_WRITE}s first" in log and f"dapt-test: rank 0 {what}: written" in log
        assert not [ln for ln in log.splitlines() if ln.startswith("srun:")], log[-3000:]  # no task killed or aborted
        assert "dapt-slurm: finished" in log
        exits, writes = exit_and_write_times(pipeline_run["times"] / str(jobs[stage]))
        assert sorted(exits) == ["0", "1"] and len(writes) == 1, (stage, exits, writes)  # every rank exited by itself
        assert min(exits.values()) >= writes[0], (stage, exits, writes)  # ... after rank 0 had written
    assert (out / "finetune" / "model" / "model.safetensors").is_file()
    results = json.loads((out / "eval" / "eval_results.json").read_text())
    assert results["n_examples"] == 37 and results["world_size"] == 2
    card_entry = out / "finetune" / "model" / "results" / f"{results['set']}.json"
    assert json.loads(card_entry.read_text())["accuracy"] == results["accuracy"]
    assert f"| {results['set']} | 37 |" in (out / "finetune" / "model" / "README.md").read_text()
    assert "model card updated: " in logs["eval"]
    print(f"srun --wait=3, rank 0 writes {SLOW_WRITE}s slower: MLM, fine-tune and eval complete, every rank left "
          f"after rank 0's write")


@pytest.mark.slurm
def test_bad_input_is_one_line_and_nonzero(cluster, tmp_path, tiny_model, base_env):
    cluster.ensure(1)
    bad = {"DAPT_CONFIG": ("/nonexistent/recipe.yaml", "DAPT_CONFIG=/nonexistent/recipe.yaml: no such file"),
           "DAPT_REQUEUE": ("maybe", "DAPT_REQUEUE=maybe: expected 0 or 1"),
           "DAPT_VENV": (str(tmp_path), f"DAPT_VENV={tmp_path}: not a virtualenv (no bin/activate)")}
    jobs = {name: sbatch([*CPU_MODE, "--ntasks-per-node=1", SLURM / "mlm.sh"], tmp_path,
                         tiny_env(base_env, tiny_model, **{name: value}))
            for name, (value, _) in bad.items()}
    for name, job in jobs.items():
        info = wait_job(job, 60)
        errors = [ln for ln in log_of(job).splitlines() if "error" in ln.lower()]
        assert info["ExitCode"] == "2:0" and errors == [f"dapt-slurm: error: {bad[name][1]}"], (info["ExitCode"], errors)
    proc = subprocess.run([str(SLURM / "pipeline.sh")], cwd=tmp_path, env=job_env(base_env, DAPT_GPUS_PER_NODE="two"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "dapt-slurm: error: DAPT_GPUS_PER_NODE=two: expected a number of GPUs (0 = CPU only)"


@pytest.mark.slurm
def test_prepare_job_writes_a_manifest(cluster, tmp_path, tiny_model, demo_files, base_env):
    """`sbatch slurm/prepare.sh --stage finetune ...`: the launch.sh environment set-up (DAPT_PYTHON), the
    `python -m dapt prepare` (the checkout's dapt), one CPU = one tokenising worker, output in logs/."""
    cluster.ensure(1)
    start = time.time()
    out = tmp_path / "prep"
    job = sbatch(["--cpus-per-task=1", "--mem=500M", SLURM / "prepare.sh", "--stage", "finetune",
                  "--data_files", demo_files["train"], "--model_name_or_path", tiny_model, "--output_dir", "prep",
                  "--max_seq_length", 64, "--head_tokens", 16], tmp_path, tiny_env(base_env, tiny_model))
    log = assert_completed(job, timeout=180)
    assert (tmp_path / "logs" / f"dapt-prepare-{job}.out").is_file()  # #SBATCH --output=logs/%x-%j.out
    assert f"dapt-slurm: running: {sys.executable} -m dapt prepare --num_proc 1 --stage finetune" in log
    assert "prepared finetune data in" in log
    manifest = json.loads((out / "manifest.json").read_text())  # relative --output_dir: the submit directory
    assert manifest["settings"]["stage"] == "finetune" and manifest["settings"]["max_seq_length"] == 64
    assert manifest["source"]["rows"] == 192 and manifest["tokenizer"]["name"] == str(tiny_model)
    assert sum(split["examples"] for split in manifest["splits"].values()) == 192
    print(f"sbatch slurm/prepare.sh: {sorted(manifest['splits'])}, {time.time() - start:.0f}s")


def job_user(env: dict[str, str]) -> str:
    """The user name in launch.sh's node-local cache paths: $USER, else `id -un`."""
    import pwd

    return env.get("USER") or pwd.getpwuid(os.getuid()).pw_name


def read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slurm
@pytest.mark.dist
def test_mlm_sh_reference_batch_on_eight_ranks(cluster, tmp_path, tiny_model, demo_files, base_env):
    """The headline command at its real scale: `sbatch slurm/mlm.sh` with the script's own task layout (8 tasks
    on one node, as on an 8-GPU node; only `--gres=none --cpus-per-task=1` for CPU) and the reference recipe
    itself (the script's default DAPT_CONFIG: effective batch 64, micro batch 16), overriding only the model,
    the data, the length, one epoch and the CPU DeepSpeed config. 8 real DeepSpeed ranks: the micro batch
    shrinks to 8 (8 x 8 = 64, accumulation 1), rank 0 says so, run_config.json records the plan, it trains
    and saves a complete checkpoint. The 8 tasks also show the per-task environment of slurm/launch.sh:
    OMP_NUM_THREADS from --cpus-per-task, a TORCH_EXTENSIONS_DIR given by the user kept, TRITON_CACHE_DIR
    defaulted to node-local disk (one directory per job run)."""
    cluster.ensure(1)
    start = time.time()
    recipe = read_yaml(ROOT / "recipes" / "imdb-bert-base.yaml")
    assert (recipe["effective_batch_size"], recipe["micro_batch_size"]) == (64, 16)
    out, dumps = tmp_path / "mlm", tmp_path / "env"
    env = hooked(tiny_env(base_env, tiny_model), DAPT_TEST_ENV_DUMP=dumps)
    del env["DAPT_CONFIG"]  # the script's default: recipes/imdb-bert-base.yaml
    for name in ("OMP_NUM_THREADS", "TRITON_CACHE_DIR", "TMPDIR"):  # launch.sh's defaults
        env.pop(name, None)
    args = ["--data_files", demo_files["unlabelled"], "--output_dir", out, "--max_seq_length", 32, "--num_epochs", 1,
            "--warmup", 1, "--logging_steps", 1, "--save_steps", 0]
    job = sbatch([*CPU_MODE, SLURM / "mlm.sh", *args], tmp_path, env)  # no --ntasks-per-node: the script's 8
    log = assert_completed(job, timeout=420)
    assert f"dapt-slurm: job {job} (dapt-mlm) run 1 on " in log and ": 8 tasks, 0 GPUs/node, 1 CPUs/task" in log
    assert job_info(job)["NumTasks"] == "8"
    lines = rendezvous_lines(log)
    assert len(lines) == 1 and lines[0].startswith("dapt: launcher srun: 8 ranks (gloo), master "), lines
    notes = [ln for ln in log.splitlines() if ln.startswith("dapt: micro_batch_size")]
    assert notes == ["dapt: micro_batch_size 16 -> 8: 16 exceeds each rank's share of the effective batch "
                     "(64 / 8 ranks = 8); accumulation 1"], notes
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert run_cfg["world_size"] == 8 and run_cfg["config"]["max_seq_length"] == 32
    assert run_cfg["batch"] == {"effective": 64, "world_size": 8, "micro": 8, "accumulation": 1, "requested_micro": 16}
    ds = run_cfg["deepspeed"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 1)
    summary = json.loads((out / "summary.json").read_text())
    losses = steps_and_losses(out)
    assert summary["world_size"] == 8 and summary["steps"] >= 2 and sorted(losses) == list(range(1, summary["steps"] + 1))
    assert all(math.isfinite(v) for v in losses.values())
    # a complete checkpoint of the last step: `latest`, the state file and every rank's shards, as validated on resume
    from dapt.train import checkpoint as ckpt

    tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert tag.name == ckpt.tag_for(summary["steps"]) and (tag / ckpt.STATE_FILE).is_file()
    position = ckpt.validate(tag)
    assert (position.world_size, position.step, position.effective_batch_size) == (8, summary["steps"], 64)
    assert len(list(tag.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 8 and len(list(tag.glob("rng_rank*.pt"))) == 8
    assert (out / "model" / "model.safetensors").is_file()
    # what each of the 8 tasks saw at start-up (tests/workers/jobhooks, DAPT_TEST_ENV_DUMP)
    seen = [json.loads((dumps / f"env-{rank}.json").read_text()) for rank in range(8)]
    user = job_user(env)
    for rank, task in enumerate(seen):
        assert (task["SLURM_PROCID"], task["SLURM_CPUS_PER_TASK"], task["OMP_NUM_THREADS"]) == (str(rank), "1", "1"), task
        assert task["TORCH_EXTENSIONS_DIR"] == env["TORCH_EXTENSIONS_DIR"]  # the user's value, kept
        assert task["TRITON_CACHE_DIR"] == f"{task['TMPDIR'] or '/tmp'}/dapt-{user}-{job}.0/triton", task  # node-local
        assert task["TOKENIZERS_PARALLELISM"] == "false"
    print(f"sbatch slurm/mlm.sh, the script's 8 tasks, recipe batch 64/16 -> micro 8 x 1 x 8 ranks: "
          f"{summary['steps']} steps, {time.time() - start:.0f}s")


@pytest.mark.slurm
@pytest.mark.mpi
def test_srun_mpi_pmix(cluster, mpi_ready, tmp_path, tiny_model, demo_files, base_env):
    """`srun --mpi=pmix python launch/mlm.py`: no launcher variables, ranks from PMIX_RANK/SLURM_*."""
    cluster.ensure(1)
    start = time.time()
    out = tmp_path / "mlm"
    args = " ".join(["--model_name_or_path", str(tiny_model), "--ds_config", "ds_configs/zero2_auto.json",
                     *stage_args("mlm", out, demo_files, 1)])
    wrap = (f"srun --mpi=pmix printenv PMIX_RANK && "
            f"srun --mpi=pmix --cpus-per-task=1 {sys.executable} {ROOT / 'launch' / 'mlm.py'} {args}")
    job = sbatch(["--ntasks=2", "--cpus-per-task=1", "--output=logs/pmix-%j.out", "--wrap", wrap], tmp_path,
                 job_env(base_env, OMP_NUM_THREADS="1"))
    log = assert_completed(job)
    assert sorted(ln for ln in log.splitlines() if ln.strip() in ("0", "1")) == ["0", "1"]  # PMIX_RANK 0 and 1
    assert len(rendezvous_lines(log)) == 1 and rendezvous_lines(log)[0].startswith("dapt: launcher srun: 2 ranks")
    assert world_size(out) == 2 and max(steps_and_losses(out)) == 9
    print(f"srun --mpi=pmix: 2 ranks, {time.time() - start:.0f}s")


@pytest.mark.mpi
def test_mpirun(mpi_ready, tmp_path, tiny_model, demo_files, base_env):
    """`mpirun -np 2 python launch/mlm.py` (OpenMPI; no Slurm): ranks from OMPI_COMM_WORLD_*, the
    rendezvous address and port from rank 0 via mpi4py."""
    start = time.time()
    out = tmp_path / "mlm"
    env = job_env(base_env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                  OMPI_MCA_btl_vader_single_copy_mechanism="none", OMPI_MCA_rmaps_base_oversubscribe="1")
    cmd = ["mpirun", "-np", "2", sys.executable, str(ROOT / "launch" / "mlm.py"), "--model_name_or_path", str(tiny_model),
           "--ds_config", "ds_configs/zero2_auto.json", *stage_args("mlm", out, demo_files, 1)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [ln.rsplit(":", 1)[0] for ln in rendezvous_lines(proc.stdout)] == ["dapt: launcher mpirun: 2 ranks (gloo), master 127.0.0.1"]
    assert world_size(out) == 2 and max(steps_and_losses(out)) == 9
    print(f"mpirun -np 2: 2 ranks, {time.time() - start:.0f}s")


@pytest.mark.slurm
@pytest.mark.mpi
def test_deepspeed_multinode_launcher_carries_the_env_file(cluster, mpi_ready, tmp_path, base_env):
    """slurm/hostfile.sh in a real job writes the hostfile and the DeepSpeed env file; then DeepSpeed's
    multi-node path (`deepspeed --force_multi --hostfile H --launcher openmpi`: real mpirun, this host as the
    node) starts 2 ranks from a launcher environment WITHOUT the job's variables: they arrive only through
    the file (DS_ENV_FILE), i.e. through the launcher's `mpirun -x` exports, as they would on another node."""
    cluster.ensure(1)
    start = time.time()
    hostfile = tmp_path / "hostfile"
    carried = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
               "DAPT_DIST_TIMEOUT_MINUTES": "45", "TRANSFORMERS_OFFLINE": "1"}
    job_vars = {**carried, "HF_TOKEN": "hf_not_on_command_lines", "DAPT_ENV_SETUP": "module load x"}
    env = job_env(base_env, **job_vars)
    for name in ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "TMPDIR"):
        env.pop(name, None)
    job = sbatch(["--ntasks-per-node=2", "--cpus-per-task=1", "--output=logs/hostfile-%j.out", "--wrap",
                  f"{SLURM / 'hostfile.sh'} {hostfile}"], tmp_path, env)
    log = assert_completed(job, timeout=60)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert hostfile.read_text() == f"{host} slots=2\n"
    env_file = Path(f"{hostfile}.env")
    assert f"start the launcher with it: DS_ENV_FILE={env_file} deepspeed --hostfile {hostfile} ..." in log
    assert "left out (secrets would show on the launcher's command line): HF_TOKEN" in log
    cache = f"/tmp/dapt-{job_user(env)}-{job}.0"
    expected = {**carried, "OMP_NUM_THREADS": "1",  # the node's 2 CPUs / 2 slots
                "TORCH_EXTENSIONS_DIR": f"{cache}/torch_extensions", "TRITON_CACHE_DIR": f"{cache}/triton"}

    launcher_env = job_env(base_env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                           OMPI_MCA_btl_vader_single_copy_mechanism="none", DS_ENV_FILE=str(env_file))
    for name in [*job_vars, *expected]:
        launcher_env.pop(name, None)  # the ranks can get them only from the file
    names = sorted({*expected, "HF_TOKEN", "DAPT_ENV_SETUP"})
    cmd = [str(BIN / "deepspeed"), "--force_multi", "--no_ssh_check", "--hostfile", str(hostfile), "--master_addr",
           "127.0.0.1", "--launcher", "openmpi", "--launcher_args",
           "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo",
           str(ROOT / "tests" / "workers" / "print_env.py"), *names]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launcher_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    launcher_log = proc.stdout + proc.stderr
    assert f"deepspeed_env file = {env_file}" in launcher_log
    assert re.search(r"cmd = mpirun -n 2 -hostfile \S+ .* -x HF_HOME=\S+", launcher_log), launcher_log[-3000:]
    ranks = {}
    for line in proc.stdout.splitlines():
        if line.startswith("dapt-test-env "):
            seen = json.loads(line.split(" ", 1)[1])
            ranks[seen.pop("OMPI_COMM_WORLD_RANK")] = seen
    assert sorted(ranks) == ["0", "1"], proc.stdout[-3000:]
    for seen in ranks.values():
        assert seen == {**{n: None for n in names}, **expected}, seen  # no secret, no script-only words
    print(f"deepspeed --force_multi --launcher openmpi: {len(expected)} variables reached 2 ranks only through "
          f"{env_file.name}, {time.time() - start:.0f}s")


# --- two nodes (last: the cluster is restarted with n1, n2) ----------------------------------------

@pytest.fixture(scope="module")
def node_changes(cluster, tmp_path_factory, tiny_model, demo_files, base_env):
    """The world size changes with the node count, in one ZeRO-3 run of three jobs: stopped on 1 node x 2 tasks
    (mid-epoch: DAPT_FAULT makes rank 0 signal itself during the step; the job saves it and exits 75),
    resumed on 2 nodes x 2 tasks and stopped again, resumed on 1 x 2 to its end: more nodes, then fewer. The
    2 x 2 job is also the two-node, four-rank run of test_two_nodes_four_ranks_and_hostfile."""
    cluster.ensure(2)
    tmp_path = tmp_path_factory.mktemp("node_changes")
    start = time.time()
    out = tmp_path / "zero3"
    args = [*stage_args("mlm", out, demo_files, 1), "--keep_last", 10]  # every stop's checkpoint stays, to be checked
    faults = ",".join(f"signal=train:0:{stop - 1}" for stop in NODE_CHANGE_STOPS)
    env = tiny_env(base_env, tiny_model, DAPT_DS_CONFIG="ds_configs/zero3_auto.json", DAPT_REQUEUE=0, DAPT_FAULT=faults)
    jobs = []
    for nodes, stop in zip(NODE_CHANGE_NODES, [*NODE_CHANGE_STOPS, None]):
        job = sbatch([*CPU_MODE, f"--nodes={nodes}", "--ntasks-per-node=2", SLURM / "mlm.sh", *args], tmp_path, env)
        if stop is None:
            log = assert_completed(job, timeout=300)
        else:
            info = wait_job(job, 300)
            log = log_of(job)
            assert info["ExitCode"] == "75:0", f"{info['JobState']} {info['ExitCode']}\n{log[-4000:]}"
            assert (out / "checkpoints" / "latest").read_text().strip() == f"step{stop:07d}"
        run_cfg = json.loads((out / "run_config.json").read_text())  # this job's: rewritten by each
        jobs.append({"nodes": nodes, "log": log, "run_config": run_cfg, "steps": sorted(steps_and_losses(out))})
    return out, jobs, time.time() - start


NODE_CHANGE_NODES = (1, 2, 1)  # the three jobs' node counts, 2 tasks a node
NODE_CHANGE_STOPS = (4, 7)  # the steps the first two jobs stop after (9 in all)


@pytest.mark.slurm
def test_two_nodes_four_ranks_and_hostfile(cluster, node_changes, tmp_path, tiny_model, base_env):
    """slurm/hostfile.sh on 2 nodes x 2 tasks, and a run of 4 ranks on 2 nodes: the job of node_changes that
    resumes on 2 x 2 trains its steps there."""
    cluster.ensure(2)
    out, jobs, _ = node_changes
    env = tiny_env(base_env, tiny_model)
    hostfile = sbatch(["--nodes=2", "--ntasks-per-node=2", "--output=logs/hostfile-%j.out", "--wrap",
                       f"{SLURM / 'hostfile.sh'} {tmp_path / 'hostfile'}"], tmp_path, env)
    assert_completed(hostfile, timeout=60)
    assert (tmp_path / "hostfile").read_text() == "n1 slots=2\nn2 slots=2\n"
    two = jobs[1]
    assert two["nodes"] == 2 and "on n[1-2]: 4 tasks" in two["log"]
    # rank 0's line: n1 does not resolve, so the master is its NodeAddr
    assert [ln.rsplit(":", 1)[0] for ln in rendezvous_lines(two["log"])] == \
           ["dapt: launcher srun: 4 ranks (gloo), master 127.0.0.1"]
    assert two["run_config"]["world_size"] == 4
    first, second = NODE_CHANGE_STOPS
    assert two["steps"] == list(range(1, second + 1))  # it trained its steps, then stopped as asked
    assert sorted(steps_and_losses(out)) == list(range(1, 10))  # the effective batch is fixed: 9 steps
    print(f"2 nodes x 2 tasks: 4 ranks trained steps {first + 1}-{second} (the middle job of node_changes)")


@pytest.mark.slurm
@pytest.mark.resume
def test_resume_on_more_and_fewer_nodes(cluster, node_changes):
    """The checkpoint is converted to the universal format at each change of world size and re-partitioned;
    the data position and the loss curve continue."""
    out, jobs, seconds = node_changes
    losses = steps_and_losses(out)
    assert sorted(losses) == list(range(1, 10))  # 9 steps whatever the world size: the effective batch is fixed
    report = []
    for before, after, stop in zip(jobs, jobs[1:], NODE_CHANGE_STOPS):
        # another world size: resumed from the universal copy of the checkpoint
        assert re.search(rf"resumed from \S*step{stop:07d}\.universal at step {stop}\b", after["log"]), after["log"][-3000:]
        for job in (before, after):
            assert [ln.rsplit(":", 1)[0] for ln in rendezvous_lines(job["log"])] == \
                   [f"dapt: launcher srun: {2 * job['nodes']} ranks (gloo), master 127.0.0.1"], rendezvous_lines(job["log"])
            assert job["run_config"]["world_size"] == 2 * job["nodes"]
            assert job["run_config"]["deepspeed"]["gradient_accumulation_steps"] == 16 // (4 * 2 * job["nodes"])
        universal = out / "checkpoints" / f"step{stop:07d}.universal" / "zero" / "bert.embeddings.word_embeddings.weight"
        assert (universal / "exp_avg.pt").is_file() and (universal / "exp_avg_sq.pt").is_file()
        pre = [losses[s] for s in range(max(2, stop - 3), stop + 1)]
        spread = max(pre) - min(pre)
        assert abs(losses[stop + 1] - sum(pre) / len(pre)) <= max(0.5, 2 * spread), (pre, losses[stop + 1])
        report.append(f"{before['nodes']}x2 -> {after['nodes']}x2 at step {stop}: losses {[round(x, 3) for x in pre]}, "
                      f"then {losses[stop + 1]:.3f}")
    print(f"node count changes (ZeRO-3): {'; '.join(report)}; {seconds:.0f}s")


# --- a sweep: one job array + a summary job (one node; after the two-node test it brings the one-node
# cluster back) ----------------------------------------------------------------------------------------

@pytest.mark.slurm
def test_sweep_job_array_and_summary(cluster, tmp_path, tiny_model, demo_files, base_env):
    """`slurm/sweep.sh`: ONE array job over seeds x learning rates (here 2 x 1, both tasks at once, 1 rank
    each, fine-tuning the tiny model directly: no MLM stage), then `dapt summarize` after them (afterok);
    the summary agrees with the per-run files."""
    from dapt.layout import SweepLayout

    cluster.ensure(1)
    start = time.time()
    out = tmp_path / "sweep"
    common = ("--max_seq_length 64 --validation_split 0.1 --effective_batch_size 16 --micro_batch_size 8 "
              "--save_steps 0 --max_samples 64")
    env = tiny_env(base_env, tiny_model, DAPT_OUTPUT_DIR=out, DAPT_GPUS_PER_NODE=0, DAPT_SEEDS="1 2",
                   DAPT_LEARNING_RATES="1e-3", DAPT_SWEEP_CONCURRENCY=2,
                   DAPT_FINETUNE_ARGS=f"--data_files {demo_files['train']} --num_epochs 1 --warmup 0.1 --head_tokens 16 "
                                      f"{common}",
                   DAPT_EVAL_ARGS=f"--data_files {demo_files['test']}")
    proc = subprocess.run([str(SLURM / "sweep.sh"), "--ntasks-per-node=1", "--cpus-per-task=1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = {k: int(v) for k, v in (kv.split("=") for kv in proc.stdout.split())}
    assert list(ids) == ["array", "summarize"]
    array = ids["array"]

    def tasks() -> list[dict[str, str]]:
        lines = subprocess.run(["scontrol", "show", "job", "-o", str(array)], capture_output=True, text=True,
                               timeout=30).stdout.splitlines()
        return [dict(w.split("=", 1) for w in line.split() if "=" in w) for line in lines if line.strip()]

    deadline = time.time() + 400
    while not (len(now := tasks()) == 2 and all(t.get("JobState") in TERMINAL for t in now)):
        assert time.time() < deadline, now
        time.sleep(1)
    logs = {t["ArrayTaskId"]: Path(t["StdOut"]) for t in now}
    assert sorted(logs) == ["0", "1"] and logs["0"].name == f"dapt-sweep-{array}_0.out"  # %x-%A_%a
    for t in now:
        assert (t["JobState"], t["ExitCode"]) == ("COMPLETED", "0:0"), logs[t["ArrayTaskId"]].read_text()[-4000:]
    log = assert_completed(ids["summarize"], timeout=180)
    assert job_info(ids["summarize"])["StartTime"] >= max(t["EndTime"] for t in now)  # afterok: after all tasks
    sweep = SweepLayout(out)
    assert f"  {sweep.results}" in log and f"  {sweep.markdown}" in log

    accuracies = []
    for task, seed in (("0", 1), ("1", 2)):
        run = sweep.run(1e-3, seed)
        assert f"sweep task {task} of array {array}: learning rate 1e-3, seed {seed} -> {run.root}" in logs[task].read_text()
        cfg = json.loads(run.finetune.run_config.read_text())
        assert (cfg["config"]["seed"], cfg["config"]["learning_rate"], cfg["world_size"]) == (seed, 1e-3, 1)
        results = json.loads(run.eval.results.read_text())
        assert results["n_examples"] == 37
        accuracies.append(results["accuracy"])
    summary = json.loads(sweep.results.read_text())
    assert [(r["seed"], r["accuracy"]) for r in summary["runs"]] == [(1, accuracies[0]), (2, accuracies[1])]
    (setting,) = summary["settings"]
    assert setting["setting"] == {"learning_rate": 1e-3} and setting["n"] == 2
    assert setting["accuracy"]["mean"] == pytest.approx((accuracies[0] + accuracies[1]) / 2, abs=1e-12)
    assert setting["accuracy"]["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2 ** 0.5, abs=1e-12)
    assert sweep.markdown.is_file() and sweep.plot.is_file()
    print(f"sweep: array {array} (2 tasks) + summary {ids['summarize']}, accuracies {accuracies}, "
          f"{time.time() - start:.0f}s")
