"""FP16 with dynamic loss scaling, for real, on 2 CPU ranks: the FP16 test lane.

DeepSpeed refuses FP16 on CPUs without oneDNN fp16 (most CI machines), so these tests put
tests/fp16/sitecustomize.py first on the PYTHONPATH of the processes they start (the `fp16_env`
fixture): it lets DeepSpeed's CPU accelerator accept FP16 configs, and with DAPT_TEST_FP16_INF_GRAD it
makes chosen optimizer steps overflow (the loss times inf in `engine.backward`, on one rank or all).
The product has no switch for either. Everything else is the real thing: the ZeRO-2/3 FP16 optimizers,
DeepSpeed's dynamic loss scaler, checkpoints, export and the evaluation job.

Runs are shared between checks to keep the lane short: one ZeRO-2 MLM run with forced overflows
(uninterrupted, and stopped + resumed) and its FP32 twin; one ZeRO-3 fine-tune (export, evaluation
precision); one CPU-offload run; one run driven to the loss-scale floor."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_ok, run_cli
from ranks import ForkedJob
from test_resume import _args as resume_args

pytestmark = [pytest.mark.fp16, pytest.mark.dist]

EXIT_REQUEUE, EXIT_TRAINING_FAILED = 75, 3
ZERO2, ZERO3, OFFLOAD = "ds_configs/zero2_fp16.json", "ds_configs/zero3_fp16.json", "ds_configs/zero3_offload_fp16.json"
# The ZeRO-2 MLM runs: 2 epochs x 9 steps; steps 5-7 overflow (on rank 1 only: the overflow check is
# all-reduced, so rank 0 must skip them too); the stopped run saves at step 6, inside that burst.
INF_STEPS, INF_RANK, STOP_AT = (5, 6, 7), 1, 6
OVERFLOW_ENV = {"DAPT_TEST_FP16_INF_GRAD": f"{INF_STEPS[0]}-{INF_STEPS[-1]}@{INF_RANK}"}
PEAK_TFLOPS = 0.5


def _args(stage, out, tiny_model, demo_files, ds, epochs=2, extra=()):
    """test_resume's arguments, saving only at epoch ends and on a stop (the last --save_steps wins)."""
    return resume_args(stage, out, tiny_model, demo_files, ds, epochs, ("--save_steps", "0", *extra))


def _train(stage, out, tiny_model, demo_files, ds, env, timeout=300, **kw):
    return run_cli(f"{stage}.py", _args(stage, out, tiny_model, demo_files, ds, **kw), env, ranks=2, launcher="fork",
                   timeout=timeout)


def _records(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}, [r for r in rows if any(k.startswith("eval_") for k in r)]


def _ds_copy(tmp_path, name, src, **fp16):
    """A copy of a shipped DeepSpeed JSON with some fp16 keys changed; every other key kept."""
    cfg = json.loads((ROOT / src).read_text())
    cfg["fp16"].update(fp16)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def _assert_fp16_run(out, stage_ds):
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert run_cfg["precision"] == "fp16" and run_cfg["deepspeed"]["fp16"]["enabled"] is True
    assert run_cfg["config"]["ds_config"] == stage_ds
    train, _ = _records(out)
    assert train and all("loss_scale" in r and "skipped_steps" in r for r in train.values())
    return run_cfg, train


def _exported_weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def _assert_fp32_master_weights(out):
    """float32, and not fp16 values widened: an export of the fp16 module would round-trip through half."""
    weights = _exported_weights(out)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    not_half = sum(int((t != t.half().float()).sum()) for t in weights.values())
    total = sum(t.numel() for t in weights.values())
    assert not_half > total // 2, (not_half, total)
    return weights


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def warmup_decay_lr(real_steps: int, p: dict) -> float:
    """DeepSpeed's WarmupDecayLR (linear warmup) after `real_steps` scheduler steps, with the params dapt
    fills in (dapt/train/engine.py build_ds_config). The scheduler steps only on real optimizer steps;
    its last_batch_iteration is then real_steps - 1, and before the first step it gives warmup_min_lr."""
    it = real_steps - 1
    lo, hi, warm, total = p["warmup_min_lr"], p["warmup_max_lr"], p["warmup_num_steps"], p["total_num_steps"]
    if it < 0:
        return lo
    gamma = it / warm if it < warm else max(0.0, (total - it) / max(1.0, total - warm))
    return lo + (hi - lo) * gamma


# --- ZeRO-2 MLM: forced overflows, schedule, data position, stop and resume ----------------------

@pytest.fixture(scope="module")
def mlm_fp16(tmp_path_factory, tiny_model, demo_files, fp16_env):
    """Uninterrupted ZeRO-2 FP16 MLM run (ds_configs/zero2_fp16.json) with steps 5-7 overflowing."""
    out = tmp_path_factory.mktemp("fp16_mlm") / "run"
    start = time.time()
    assert_ok(_train("mlm", out, tiny_model, demo_files, ZERO2, {**fp16_env, **OVERFLOW_ENV}))
    return out, time.time() - start


def test_zero2_mlm_overflows_skip_steps_and_the_schedule_follows_real_steps(mlm_fp16, tmp_path, tiny_model,
                                                                            demo_files, base_env):
    out, seconds = mlm_fp16
    run_cfg, train = _assert_fp16_run(out, ZERO2)
    assert run_cfg["deepspeed"]["zero_optimization"]["stage"] == 2
    # the FP32 twin: the same JSON with fp16 off, no lane needed (and no injected overflows: FP32 has no skips)
    fp32 = tmp_path / "fp32"
    assert_ok(_train("mlm", fp32, tiny_model, demo_files, _ds_copy(tmp_path, "zero2_fp32.json", ZERO2, enabled=False),
                     base_env))
    assert json.loads((fp32 / "run_config.json").read_text())["precision"] == "fp32"
    ref, ref_evals = _records(fp32)
    _, evals = _records(out)

    # DeepSpeed's dynamic loss scaler, from the shipped JSON: the first overflow of a burst uses up the
    # hysteresis, each further one halves the scale; no regrowth within loss_scale_window steps
    fp16 = json.loads((ROOT / ZERO2).read_text())["fp16"]
    assert fp16["loss_scale_window"] > len(train)
    scale, hysteresis, skipped = 2.0 ** fp16["initial_scale_power"], fp16["hysteresis"], 0
    for step in sorted(train):
        if step in INF_STEPS:
            skipped += 1
            if hysteresis > 1:
                hysteresis -= 1
            else:
                scale = max(scale / 2, fp16["min_loss_scale"])
        assert (train[step]["skipped_steps"], train[step]["loss_scale"]) == (skipped, scale), (step, train[step])
        assert "grad_norm" not in train[step] if step in INF_STEPS else "grad_norm" in train[step]

    # the LR schedule counts real optimizer steps only: frozen during the burst, then on from where it was
    sched = run_cfg["deepspeed"]["scheduler"]
    assert sched["type"] == "WarmupDecayLR" and sched["params"]["warmup_type"] == "linear"
    for step, r in train.items():
        assert r["lr"] == pytest.approx(warmup_decay_lr(step - r["skipped_steps"], sched["params"]), rel=1e-9, abs=1e-15), step
    last_real = INF_STEPS[0] - 1
    assert [train[s]["lr"] for s in INF_STEPS] == [train[last_real]["lr"]] * len(INF_STEPS)
    assert train[INF_STEPS[-1] + 1]["lr"] == pytest.approx(warmup_decay_lr(last_real + 1, sched["params"]))
    assert train[max(train)]["lr"] > ref[max(ref)]["lr"]  # 3 real steps fewer: not as far down the decay

    # the data position does not drift: the FP32 twin's step counter, epochs and epoch-end evaluations,
    # and the same batches (the losses agree until the first skipped update changes the weights)
    assert [(s, r["epoch"]) for s, r in sorted(train.items())] == [(s, r["epoch"]) for s, r in sorted(ref.items())]
    assert [(e["step"], e["epoch"], e["eval_masked_tokens"]) for e in evals] == \
           [(e["step"], e["epoch"], e["eval_masked_tokens"]) for e in ref_evals]
    assert [e["epoch"] for e in evals] == [1.0, 2.0] and sorted(train) == list(range(1, 19))
    same_weights = range(1, INF_STEPS[0] + 1)
    fp16_vs_fp32 = max(abs(train[s]["loss"] - ref[s]["loss"]) for s in same_weights)
    assert fp16_vs_fp32 < 0.02, fp16_vs_fp32
    lrs = [float(f"{train[s]['lr']:.3g}") for s in sorted(train)]
    print(f"zero2 fp16 MLM ({seconds:.0f}s): skipped_steps {[train[s]['skipped_steps'] for s in sorted(train)]}, "
          f"loss_scale {[int(train[s]['loss_scale']) for s in sorted(train)]}, lr {lrs}; "
          f"fp16 vs fp32 loss, steps 1-{INF_STEPS[0]}: max |diff| {fp16_vs_fp32:.2e}")


def test_zero2_mlm_stop_and_resume_restores_the_loss_scaler(mlm_fp16, tmp_path, tiny_model, demo_files, fp16_env):
    ref_out, _ = mlm_fp16
    ref, ref_evals = _records(ref_out)
    out = tmp_path / "run"
    env = {**fp16_env, **OVERFLOW_ENV}
    first = _train("mlm", out, tiny_model, demo_files, ZERO2, {**env, "DAPT_FAULT": f"signal=train:0:{STOP_AT - 1}"})
    assert first.returncode == EXIT_REQUEUE, first.stdout[-3000:] + first.stderr[-3000:]
    tag = f"step{STOP_AT:07d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == tag
    # the scaler as saved (inside the overflow burst: hysteresis used up, scale halved once)
    for rank in (0, 1):
        states = torch.load(out / "checkpoints" / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                            map_location="cpu", weights_only=False)
        scaler = states["optimizer_state_dict"]["loss_scaler"]
        saved = (scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis)
        assert saved == (ref[STOP_AT]["loss_scale"], STOP_AT, STOP_AT - 1, 1), saved

    second = _train("mlm", out, tiny_model, demo_files, ZERO2, env)
    assert_ok(second)
    assert f"resumed from {out / 'checkpoints' / tag} at step {STOP_AT}" in second.stdout
    run, evals = _records(out)
    assert sorted(run) == sorted(ref) == list(range(1, 19))
    # after the resume: the same loss scale (the burst's third overflow halves it again: the hysteresis
    # was restored as used up), the same skipped-step count and LR, and the same losses
    for step in range(STOP_AT + 1, max(ref) + 1):
        for key in ("loss_scale", "skipped_steps", "lr"):
            assert run[step][key] == ref[step][key], (step, key, run[step][key], ref[step][key])
    worst = max(abs(run[s]["loss"] - ref[s]["loss"]) for s in run)
    assert worst <= 1e-6, worst
    assert [e["step"] for e in evals] == [e["step"] for e in ref_evals]
    assert [e["eval_loss"] for e in evals] == pytest.approx([e["eval_loss"] for e in ref_evals], abs=1e-6)
    a, b = _exported_weights(ref_out), _exported_weights(out)
    weights = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert weights <= 1e-6, weights
    print(f"zero2 fp16 stop at step {STOP_AT} (loss scale {ref[STOP_AT]['loss_scale']:g}, hysteresis used up), "
          f"resume: loss_scale after {[int(run[s]['loss_scale']) for s in range(STOP_AT + 1, STOP_AT + 3)]}...; "
          f"max |loss diff| vs uninterrupted {worst:.2e}, max |weight diff| {weights:.2e}")


# --- ZeRO-3 fine-tune: export of the FP32 master weights, FP16 evaluation -----------------------

@pytest.fixture(scope="module")
def wide_classifier(tmp_path_factory, tiny_model):
    """The tiny BERT as a classifier with initializer_range 0.5: at BERT's 0.02 a tiny random model gives every
    review the same logits (and 20 steps do not change that), so fp16 vs fp32 predictions would be compared on
    one class only; at 0.5 the fine-tuned model predicts both classes, with p(positive) from ~0.01 to ~0.99."""
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wide_classifier")
    config = AutoConfig.from_pretrained(tiny_model)
    config.initializer_range, config.num_labels = 0.5, 2
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def finetune_zero3(tmp_path_factory, wide_classifier, demo_files, fp16_env):
    out = tmp_path_factory.mktemp("fp16_ft") / "run"
    start = time.time()
    # --peak_tflops: MFU is logged on CPU too (the table of GPUs needs a CUDA device name)
    assert_ok(_train("finetune", out, wide_classifier, demo_files, ZERO3, fp16_env, extra=["--peak_tflops", PEAK_TFLOPS]))
    return out, time.time() - start


def test_zero3_finetune_exports_fp32_master_weights(finetune_zero3):
    out, seconds = finetune_zero3
    run_cfg, train = _assert_fp16_run(out, ZERO3)
    assert run_cfg["deepspeed"]["zero_optimization"]["stage"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "fp16" and summary["steps"] == max(train)
    diff = summary["export_max_abs_logit_diff"]
    # the engine's logits are FP16 (about 3 significant digits; these are O(1-5)), the export's FP32: they differ, a little
    assert 0 < diff <= 2e-2, diff
    weights = _assert_fp32_master_weights(out)
    # MFU = real tokens/s x model FLOPs per token (6N + 12·L·H·Q·T, N without embeddings) / (peak x ranks);
    # N counted here on the exported model, there on the ZeRO-3 partitioned module (ds_numel)
    config = json.loads((out / "model" / "config.json").read_text())
    n = sum(t.numel() for name, t in weights.items() if "embeddings" not in name)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    flops_per_token = 6 * n + 12 * layers * hidden * run_cfg["config"]["max_seq_length"]
    for r in train.values():
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token / (PEAK_TFLOPS * 1e12 * 2), rel=1e-9)
    print(f"zero3 fp16 fine-tune ({seconds:.0f}s): {summary['steps']} steps, (step, skipped, loss_scale) "
          f"{[(s, r['skipped_steps'], int(r['loss_scale'])) for s, r in sorted(train.items())]}; export: {len(weights)} float32 tensors, "
          f"max |logit diff| engine (fp16) vs export (fp32) {diff:.2e}")


def test_evaluation_in_fp16_agrees_with_fp32(finetune_zero3, tmp_path, demo_files, fp16_env):
    """launch/evaluate.py --precision fp16 (autocast; on CPU only in the lane) vs --precision fp32, the two
    jobs side by side (one rank each), every prediction saved."""
    out, _ = finetune_zero3
    jobs = {p: ForkedJob(["-m", "dapt", "evaluate", "--model_name_or_path", str(out),
                          "--data_files", str(demo_files["test"]), "--output_dir", str(tmp_path / p),
                          "--eval_name", f"test-{p}", "--precision", p, "--save_predictions"], fp16_env, 1)
            for p in ("fp16", "fp32")}
    for job in jobs.values():
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-3000:]
    results = {p: json.loads((tmp_path / p / "eval_results.json").read_text()) for p in jobs}
    preds = {p: [json.loads(line) for line in (tmp_path / p / "predictions.jsonl").read_text().splitlines()] for p in jobs}
    assert results["fp16"]["precision"] == "fp16" and results["fp32"]["precision"] == "fp32"
    assert len(preds["fp16"]) == len(preds["fp32"]) == results["fp16"]["n_examples"] == 37
    assert [p["row"] for p in preds["fp16"]] == [p["row"] for p in preds["fp32"]]
    assert {p["predicted"] for p in preds["fp32"]} == {"negative", "positive"}  # a comparison on both classes
    differ = sum(a["predicted"] != b["predicted"] for a, b in zip(preds["fp16"], preds["fp32"]))
    prob_diff = max(abs(a["probabilities"]["positive"] - b["probabilities"]["positive"])
                    for a, b in zip(preds["fp16"], preds["fp32"]))
    assert 0 < prob_diff < 0.05, prob_diff  # autocast really ran in half precision, and only rounding differs
    assert differ <= 2, differ
    margins = sorted(abs(p["probabilities"]["positive"] - 0.5) for p in preds["fp32"])
    print(f"evaluation fp16 vs fp32: {differ} of 37 predicted labels differ, max |p(positive) diff| {prob_diff:.2e} "
          f"(closest fp32 call: p(positive) 0.5 +- {margins[0]:.3f}); accuracy {results['fp16']['accuracy']:.4f} vs "
          f"{results['fp32']['accuracy']:.4f}")


# --- ZeRO-3 with CPU offload (DeepSpeedCPUAdam) ---------------------------------------------------

def test_zero3_offload_fp16_runs_and_exports(tmp_path, tiny_model, demo_files, fp16_env):
    """ds_configs/zero3_offload_fp16.json as shipped. The first run on a machine JIT-builds DeepSpeed's
    cpu_adam op (4-8 min on 2 cores; cached in ~/.cache/torch_extensions afterwards, per ninja version: the
    one on PATH, as for every DeepSpeed op the tests build)."""
    out = tmp_path / "run"
    start = time.time()
    proc = _train("mlm", out, tiny_model, demo_files, OFFLOAD, fp16_env, epochs=1, timeout=900)
    assert_ok(proc)
    run_cfg, train = _assert_fp16_run(out, OFFLOAD)
    ds = run_cfg["deepspeed"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["zero_optimization"]["stage"] == 3
    assert run_cfg["optimizer"] == "cpu_adam" and "optimizer" not in ds  # DeepSpeedCPUAdam, built by dapt for the offload
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == max(train) == 9 and 0 < summary["export_max_abs_logit_diff"] <= 1e-2
    _assert_fp32_master_weights(out)
    print(f"zero3 offload fp16 MLM: {summary['steps']} steps, export max |logit diff| "
          f"{summary['export_max_abs_logit_diff']:.2e}, {time.time() - start:.0f}s")


# --- the loss-scale floor -------------------------------------------------------------------------

def test_loss_scale_floor_is_one_line_and_exit_3(tmp_path, tiny_model, demo_files, fp16_env):
    """Scale 4, no hysteresis, floor 1. Steps 1-3 are fine and step 3 is saved (--save_steps 3); from step 4 on
    every step overflows (on rank 1): steps 4 and 5 are skipped (4 -> 2 -> 1) and step 6 hits the floor. The
    checkpoint of step 3 must stay what `latest` names, byte for byte: hashed as soon as `latest` names it
    (the run is then still training), and again after the failure."""
    ds = _ds_copy(tmp_path, "zero2_fp16_floor.json", ZERO2, initial_scale_power=2, hysteresis=1, min_loss_scale=1)
    out = tmp_path / "run"
    ckpts, good = out / "checkpoints", "step0000003"
    args = _args("finetune", out, tiny_model, demo_files, ds, epochs=1, extra=["--save_steps", "3"])
    env = {**fp16_env, "DAPT_TEST_FP16_INF_GRAD": "4-@1"}
    proc = ForkedJob(["-m", "dapt", "finetune", *map(str, args)], env, 2)
    try:
        deadline = time.time() + 300
        while not ((ckpts / "latest").is_file() and (ckpts / "latest").read_text().strip() == good):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint of step 3"
            time.sleep(0.05)
        before = _hashes(ckpts)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out_text, err_text = proc.output()
    assert rc == EXIT_TRAINING_FAILED, f"exit {rc}\n{out_text[-3000:]}\n{err_text[-3000:]}"
    assert "Traceback" not in err_text and "Traceback" not in out_text, err_text[-3000:]
    lines = [ln for ln in err_text.splitlines() if "dapt: error:" in ln]
    assert sorted(ln.split("]")[0] for ln in lines) == ["[rank 0", "[rank 1"], err_text[-3000:]  # one line per rank
    for line in lines:
        assert "FP16 loss scale at its minimum (1) and the gradients still overflow, at optimizer step 6" in line, line
        assert "BF16" in line and "lower learning_rate (now 0.001)" in line and f"--resume {ckpts}/<tag>" in line, line
        assert line.endswith(f"last good checkpoint: {good}, nothing saved over it"), line
    assert (ckpts / "latest").read_text().strip() == good
    assert _hashes(ckpts) == before  # nothing written over it, nothing new
    train, _ = _records(out)
    trajectory = [(s, train[s]["skipped_steps"], train[s]["loss_scale"]) for s in sorted(train)]
    assert trajectory == [(1, 0, 4.0), (2, 0, 4.0), (3, 0, 4.0), (4, 1, 2.0), (5, 2, 1.0)], trajectory
    print(f"floor: (step, skipped, scale) {trajectory}; then step 6 -> exit 3; {len(before)} checkpoint files "
          f"unchanged; {lines[0]}")


@pytest.mark.parametrize("order", ["fp16 first", "jobhooks first"])
def test_test_hook_directories_chain_once_each(order, tmp_path):
    """The FP16 lane and the Slurm job hooks (tests/workers/jobhooks) may both be on a child's PYTHONPATH:
    each sitecustomize runs once and chains to the one after its own directory, whichever comes first,
    and a plain sitecustomize further down the path still runs (it was an endless chain before)."""
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.DAPT_TEST_LAST_SITE = True\n")
    dirs = [ROOT / "tests" / "fp16", ROOT / "tests" / "workers" / "jobhooks"]
    if order == "jobhooks first":
        dirs.reverse()
    probe = ("import builtins, sys; print(sorted(sorted(f.patches) for f in sys.meta_path if hasattr(f, 'patches')),"
             " getattr(builtins, 'DAPT_TEST_LAST_SITE', False))")
    env = {**os.environ, "DAPT_TEST_SLOW_WRITE": "1", "PYTHONPATH": os.pathsep.join(map(str, [*dirs, tmp_path]))}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == ("[['dapt.jobs.evaluate', 'dapt.jobs.trainer'], "
                                          "['deepspeed.accelerator.cpu_accelerator']] True")
