"""Checkpoints that survive anything, with real processes and real signals on 2 CPU ranks.

Interruptions at exact places use DAPT_FAULT (dapt/checkpoint.py:inject): the process sends itself
a real SIGUSR1 or SIGKILL at a given rank and step. External signals are sent from here to the
ranks' pids while they train."""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
from conftest import ROOT, assert_ok, deepspeed_command, run_cli
from ranks import ForkedJob

pytestmark = [pytest.mark.resume, pytest.mark.dist]
EXIT_REQUEUE = 75


def _args(stage, out, tiny_model, demo_files, ds, epochs=2, extra=()):
    data = demo_files["unlabelled"] if stage == "mlm" else demo_files["train"]
    args = ["--model_name_or_path", tiny_model, "--data_files", data, "--output_dir", out, "--ds_config", ds,
            "--max_seq_length", "64", "--num_epochs", epochs, "--learning_rate", "1e-3", "--warmup", "0.1",
            "--validation_split", "0.1", "--effective_batch_size", "16", "--micro_batch_size", "4",
            "--logging_steps", "1", "--seed", "3", "--save_steps", "4", *extra]
    if stage == "finetune":
        args += ["--head_tokens", "16"]
    return args


def _env(base_env, fault=None):
    env = dict(base_env)
    if fault:
        env["DAPT_FAULT"] = fault
    return env


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if any(k.startswith("eval_") for k in r)]


def _latest(out):
    return (out / "checkpoints" / "latest").read_text().strip()


def _weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("stage, ds", [("mlm", "ds_configs/zero2_auto.json"), ("finetune", "ds_configs/zero3_auto.json")])
def test_interrupted_and_resumed_run_is_the_same_run(stage, ds, tmp_path, tiny_model, demo_files, base_env):
    script = f"{stage}.py"
    ref = tmp_path / "reference"
    assert_ok(run_cli(script, _args(stage, ref, tiny_model, demo_files, ds), base_env, ranks=2, launcher="fork"))
    ref_losses, ref_evals = _losses(ref)
    total = max(ref_losses)

    run = tmp_path / "interrupted"
    stop_after = total // 2 - 1  # mid-epoch 1 of 2, and mid gradient-accumulation (2 micro-batches per step)
    first = run_cli(script, _args(stage, run, tiny_model, demo_files, ds), _env(base_env, f"signal=train:0:{stop_after}"),
                    ranks=2, launcher="fork")
    assert first.returncode == EXIT_REQUEUE, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"stopped by signal {int(signal.SIGUSR1)} at step {stop_after + 1}" in first.stdout
    assert _latest(run) == f"step{stop_after + 1:07d}"  # the cycle in progress finished, then saved
    second = run_cli(script, _args(stage, run, tiny_model, demo_files, ds), base_env, ranks=2, launcher="fork")
    assert_ok(second)
    assert f"resumed from {run / 'checkpoints' / f'step{stop_after + 1:07d}'} at step {stop_after + 1}" in second.stdout
    losses, evals = _losses(run)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, total + 1))
    worst = max(abs(losses[s] - ref_losses[s]) for s in losses)
    assert worst <= 1e-6, worst
    assert [e["step"] for e in evals] == [e["step"] for e in ref_evals]
    a, b = _weights(ref), _weights(run)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    print(f"{stage}: {total} steps, stop at {stop_after + 1}; max |loss diff| {worst:.2e}")


def _rank_pids(launcher_proc, n, timeout=60):
    if isinstance(launcher_proc, ForkedJob):
        return launcher_proc.rank_pids
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = []
        for p in psutil.Process(launcher_proc.pid).children(recursive=True):
            try:
                if any(a.startswith("--local_rank") for a in p.cmdline()):  # the ranks, not the launchers
                    kids.append(p.pid)
            except psutil.Error:  # a short-lived helper process already gone
                continue
        if len(kids) == n:
            return kids
        time.sleep(0.2)
    raise AssertionError("ranks did not start")


def _wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(
                json.loads(line).get("step", 0) >= step for line in (out / "metrics.jsonl").read_text().splitlines()
                if line.strip()):
            return
        assert proc.poll() is None, "run ended before the signal"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def _start(stage, out, tiny_model, demo_files, base_env, ds="ds_configs/zero2_auto.json", epochs=30, launcher="deepspeed"):
    args = [*map(str, _args(stage, out, tiny_model, demo_files, ds, epochs=epochs, extra=["--save_steps", "0"]))]
    if launcher == "fork":
        return ForkedJob(["-m", "dapt", stage, *args], base_env, 2)
    cmd = [*deepspeed_command(f"{stage}.py", 2), *args]
    return subprocess.Popen(cmd, env=base_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# SIGTERM to one rank under the deepspeed launcher: the launcher passes the requeue exit code (75) on;
# SIGUSR1 to every rank, forked ranks (tests/ranks.py): the agreement on one step is dapt's, not the launcher's.
@pytest.mark.parametrize("sig, who, launcher", [(signal.SIGTERM, "one", "deepspeed"), (signal.SIGUSR1, "all", "fork")])
def test_stop_signal_saves_one_agreed_step_then_resume(sig, who, launcher, tmp_path, tiny_model, demo_files, base_env):
    out = tmp_path / "run"
    proc = _start("mlm", out, tiny_model, demo_files, base_env, epochs=3, launcher=launcher)
    pids = _rank_pids(proc, 2)
    _wait_for_step(out, 5, proc)
    for pid in pids if who == "all" else pids[1:]:
        os.kill(pid, sig)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, stdout[-4000:]
    tag = _latest(out)
    state = json.loads((out / "checkpoints" / tag / "dapt_state.json").read_text())
    step = state["position"]["step"]
    assert f"stopped by signal {int(sig)} at step {step}" in stdout
    shards = {p.name for p in (out / "checkpoints" / tag).glob("*optim_states.pt")}
    assert len(shards) == 2  # both ranks saved the same step
    resumed = run_cli("mlm.py", _args("mlm", out, tiny_model, demo_files, "ds_configs/zero2_auto.json", epochs=3,
                                      extra=["--save_steps", "0"]), base_env, ranks=2, launcher="fork")
    assert_ok(resumed)
    losses, _ = _losses(out)
    assert sorted(losses) == list(range(1, max(losses) + 1)) and f"at step {step}" in resumed.stdout
    print(f"{sig.name} to {who}: checkpoint at step {step}, resumed to step {max(losses)}")


def test_kill_9_of_one_rank_ends_the_job_and_resume_works(tmp_path, tiny_model, demo_files, base_env):
    out = tmp_path / "run"
    proc = _start("mlm", out, tiny_model, demo_files, base_env, epochs=3)
    pids = _rank_pids(proc, 2)
    _wait_for_step(out, 5, proc)
    killed_at = time.time()
    os.kill(pids[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    waited = time.time() - killed_at
    assert proc.returncode != 0 and waited < 60, waited
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # epoch-end checkpoints exist (save_steps 0); the rerun continues from the last complete one
    resumed = run_cli("mlm.py", _args("mlm", out, tiny_model, demo_files, "ds_configs/zero2_auto.json", epochs=3,
                                      extra=["--save_steps", "0"]), base_env, ranks=2, launcher="fork")
    assert_ok(resumed)
    print(f"kill -9: job exited {waited:.1f}s after the kill")


def test_kill_during_save_keeps_latest_valid(tmp_path, tiny_model, demo_files, base_env):
    out = tmp_path / "run"
    args = _args("mlm", out, tiny_model, demo_files, "ds_configs/zero3_auto.json", epochs=1, extra=["--save_steps", "2"])
    crashed = run_cli("mlm.py", args, _env(base_env, "kill=save:1:4"), ranks=2, launcher="fork")
    assert crashed.returncode != 0
    assert _latest(out) == "step0000002"
    assert (out / "checkpoints" / "step0000004").is_dir()  # partly written, never pointed to
    assert not (out / "checkpoints" / "step0000004" / "dapt_state.json").exists()
    resumed = run_cli("mlm.py", args, base_env, ranks=2, launcher="fork")
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout


# ZeRO-1 shares ZeRO-2's optimizer class, checkpoint layout and universal conversion: not run separately.
@pytest.mark.parametrize("ds, before, after", [("ds_configs/zero2_auto.json", 2, 1), ("ds_configs/zero3_auto.json", 1, 2)])
def test_resume_on_another_world_size(ds, before, after, tmp_path, tiny_model, demo_files, base_env):
    out = tmp_path / "run"
    args = _args("mlm", out, tiny_model, demo_files, ds, epochs=2, extra=["--keep_last", "50"])
    launcher = lambda n: ("fork", n)  # noqa: E731  (1 rank: plain `python`, no launcher environment)
    kind, n = launcher(before)
    first = run_cli("mlm.py", args, _env(base_env, "signal=train:0:9"), ranks=n, launcher=kind)
    assert first.returncode == EXIT_REQUEUE, first.stdout[-3000:] + first.stderr[-3000:]
    kind, n = launcher(after)
    second = run_cli("mlm.py", args, base_env, ranks=n, launcher=kind)
    assert_ok(second)
    losses, _ = _losses(out)
    total = max(losses)
    assert sorted(losses) == list(range(1, total + 1))
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert run_cfg["world_size"] == after and run_cfg["deepspeed"]["gradient_accumulation_steps"] == 4 // after
    # the optimizer moments travelled: the universal copy holds Adam's exp_avg/exp_avg_sq per parameter
    universal = out / "checkpoints" / "step0000010.universal" / "zero" / "bert.embeddings.word_embeddings.weight"
    moments = [torch.load(universal / f"{k}.pt", weights_only=False) for k in ("exp_avg", "exp_avg_sq")]
    moments = [m["param"] if isinstance(m, dict) else m for m in moments]
    assert all(m.abs().sum() > 0 for m in moments)
    pre = [losses[s] for s in range(7, 11)]
    post = losses[11]
    spread = max(pre) - min(pre)
    assert abs(post - sum(pre) / len(pre)) <= max(0.5, 2 * spread), (pre, post)
    print(f"world {before}->{after} ({ds}): losses before stop {['%.3f' % x for x in pre]}, first after {post:.3f}")


def test_corrupt_or_missing_checkpoints_are_errors(tmp_path, tiny_model, demo_files, base_env):
    out = tmp_path / "run"
    args = _args("mlm", out, tiny_model, demo_files, "ds_configs/zero2_auto.json", epochs=1, extra=["--save_steps", "4"])
    assert_ok(run_cli("mlm.py", args, base_env, ranks=2, launcher="fork"))
    ck = out / "checkpoints"
    tag = _latest(out)

    def error(extra=()):
        proc = run_cli("mlm.py", [*args, *extra], base_env, launcher="fork")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dapt: error:")]
        assert len(lines) == 1
        return lines[0]

    shard = ck / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert f"checkpoint file damaged: {shard}" in error()
    shard.unlink()
    assert f"checkpoint file missing: {shard}" in error()
    shard.write_bytes(data)
    (ck / "latest").write_text("step9999999")
    assert "names checkpoint 'step9999999', which does not exist" in error()
    (ck / "latest").write_text(tag)
    assert "is not empty" in error(["--resume", "never"])
    assert "checkpoint not found" in error(["--resume", str(tmp_path / "nope")])
    state = ck / tag / "dapt_state.json"
    state.unlink()
    assert f"is incomplete: {state} is missing" in error()
