"""The Trainer's loop logic, in this process: a real DeepSpeed engine (world of one, gloo), a tiny BERT.

What a 2-rank subprocess run adds (rank agreement, sharding, world-size changes) is in test_resume.py and
test_pipeline_dist.py; here the loop itself: accumulation, logging cadence, evaluation records, the stop
signal and the exact position a resumed run continues from.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import ROOT
from safetensors.torch import load_file

from dapt.config import FinetuneConfig, MLMConfig
from dapt.distributed import setup_distributed, shutdown
from dapt.errors import DaptError, StopRequested
from dapt.jobs.trainer import Trainer
from dapt.train.tasks import FINETUNE, MLM

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def clean_env():
    """A world of one for this module, set up once and kept across runs (a Trainer leaves a process group
    it did not create alone: DeepSpeed caches its groups); os.environ is restored afterwards."""
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DAPT_FAULT"):
        os.environ.pop(key, None)
    os.environ.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    info = setup_distributed()
    assert info.owns_group and info.world_size == 1
    yield info
    shutdown()
    os.environ.clear()
    os.environ.update(saved)


def mlm_cfg(out, tiny_model, demo_files, **kw) -> MLMConfig:
    values = dict(output_dir=str(out), model_name_or_path=str(tiny_model), data_files=[str(demo_files["unlabelled"])],
                  ds_config=str(ROOT / "ds_configs" / "zero2_auto.json"), max_seq_length=32, max_samples=60,
                  effective_batch_size=8, micro_batch_size=2, num_epochs=2, learning_rate=1e-3, warmup=2,
                  logging_steps=2, save_steps=0, validation_split=0.1, wandb_mode="disabled", progress="lines")
    values.update(kw)
    return MLMConfig(**values)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_logging_and_evaluation(tmp_path, tiny_model, demo_files, clean_env):
    trainer = Trainer(mlm_cfg(tmp_path / "run", tiny_model, demo_files), MLM)
    summary = trainer.run()
    steps, accum = trainer.total_steps, trainer.accum
    assert accum == 4 and steps == 2 * trainer.per_epoch and summary["steps"] == steps
    # DeepSpeed stepped the optimizer once per `accum` micro-batches, never in between
    assert trainer.engine.global_steps == steps and trainer.engine.micro_steps == steps * accum
    logged = records(tmp_path / "run")
    train_steps = [r["step"] for r in logged if "loss" in r]
    expected = sorted({s for s in range(2, steps + 1, 2)} | {steps})
    assert train_steps == expected  # every logging_steps, and the last step
    evals = [r for r in logged if "eval_loss" in r]
    assert [r["step"] for r in evals] == [trainer.per_epoch, steps] and [r["epoch"] for r in evals] == [1.0, 2.0]
    assert all(r["loss"] > 0 and r["lr"] >= 0 and r["tokens_per_s"] > 0 for r in logged if "loss" in r)
    # the schedule follows optimizer steps: the lr of step s (index i = s - 1) is linear warmup over 2
    # steps from 0, then linear decay to 0 at the end
    for r in (r for r in logged if "loss" in r):
        i = r["step"] - 1
        expected = 1e-3 * i / 2 if i < 2 else 1e-3 * (steps - i) / (steps - 2)
        assert abs(r["lr"] - expected) < 1e-12, (r["step"], r["lr"], expected)
    assert summary["export_max_abs_logit_diff"] <= 1e-4 and (tmp_path / "run" / "model" / "config.json").is_file()


def test_stop_signal_mid_accumulation_saves_the_step_and_resume_is_exact(tmp_path, tiny_model, demo_files,
                                                                        clean_env):
    # logging every step: a logged window never spans the stop, so each record is one step's loss
    full = Trainer(mlm_cfg(tmp_path / "full", tiny_model, demo_files, logging_steps=1), MLM)
    full.run()
    reference = {r["step"]: r["loss"] for r in records(tmp_path / "full") if "loss" in r}

    # SIGUSR1 to this process during micro-batch 1 of optimizer step 5 (0-based position.step 4)
    os.environ["DAPT_FAULT"] = "signal=train:0:4"
    stopped = Trainer(mlm_cfg(tmp_path / "split", tiny_model, demo_files, logging_steps=1), MLM)
    with pytest.raises(StopRequested) as stop:
        stopped.run()
    del os.environ["DAPT_FAULT"]
    assert stop.value.signum == signal.SIGUSR1 and stop.value.step == 5
    assert stopped.engine.micro_steps == 5 * stopped.accum  # the accumulation cycle was finished first
    ckpts = tmp_path / "split" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step0000005" and (ckpts / "step0000005" / "dapt_state.json").is_file()
    assert signal.getsignal(signal.SIGUSR1) is not stopped.stop._handler  # handlers put back

    resumed = Trainer(mlm_cfg(tmp_path / "split", tiny_model, demo_files, logging_steps=1), MLM)
    resumed.run()
    assert resumed.resumed_from.name == "step0000005"
    got = {r["step"]: r["loss"] for r in records(tmp_path / "split") if "loss" in r}
    assert got.keys() == reference.keys()  # nothing logged twice or lost
    assert max(abs(got[s] - reference[s]) for s in reference) == 0.0
    full_w, split_w = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("full", "split"))
    assert max(float((full_w[k] - split_w[k]).abs().max()) for k in full_w) == 0.0
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["steps"] == full.total_steps


def test_finished_run_is_not_redone(tmp_path, tiny_model, demo_files, clean_env):
    cfg = mlm_cfg(tmp_path / "run", tiny_model, demo_files, num_epochs=1)
    first = Trainer(cfg, MLM).run()
    again = Trainer(mlm_cfg(tmp_path / "run", tiny_model, demo_files, num_epochs=1), MLM)
    assert again.run() == first and not hasattr(again, "engine")
    # more epochs on a finished run would train past its decayed schedule: refused, in one line
    with pytest.raises(DaptError, match=r"is a finished run of 1 epoch\(s\); num_epochs 2 would extend it"):
        Trainer(mlm_cfg(tmp_path / "run", tiny_model, demo_files, num_epochs=2), MLM).run()


def test_classification_task_logs_accuracy(tmp_path, tiny_model, demo_files, clean_env):
    cfg = FinetuneConfig(output_dir=str(tmp_path / "ft"), model_name_or_path=str(tiny_model),
                         data_files=[str(demo_files["train"])], ds_config=str(ROOT / "ds_configs" / "zero2_auto.json"),
                         max_seq_length=32, head_tokens=8, effective_batch_size=16, micro_batch_size=8, num_epochs=1,
                         learning_rate=1e-3, logging_steps=5, save_steps=0, validation_split=0.2,
                         wandb_mode="disabled", progress="lines")
    trainer = Trainer(cfg, FINETUNE)
    summary = trainer.run()
    final = summary["final_eval"]
    assert trainer.accum == 2 and 0 <= final["eval_accuracy"] <= 1 and final["eval_n_examples"] == 38
    config = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert config["dapt"] == {"stage": "finetune", "max_seq_length": 32, "truncation": "head+tail", "head_tokens": 8}


def test_selection_logic():
    from dapt.train.selection import Selection

    sel = Selection("accuracy", patience=2)
    for step, value in ((2, 0.5), (4, 0.7), (6, 0.7), (8, 0.6)):
        sel.update({"step": step, "eval_accuracy": value})
    assert (sel.best_step, sel.best_value, sel.since_best, sel.evaluations, sel.stopped_early) == (4, 0.7, 2, 4, True)
    loss = Selection("loss")
    for step, value in ((1, 3.0), (2, 2.5), (3, 2.7)):
        loss.update({"step": step, "eval_loss": value})
    assert (loss.best_step, loss.stopped_early) == (2, False)  # lower is better; no patience: never stops
    resumed = Selection("accuracy", patience=2)
    resumed.load_state_dict(sel.state_dict())
    assert resumed == sel
    other = Selection("f1_macro", patience=2)
    other.load_state_dict(sel.state_dict())  # another metric: selection starts over
    assert other.best_step is None and not other.stopped_early
    longer = Selection("accuracy", patience=5)
    longer.load_state_dict(sel.state_dict())  # more patience on resume: training may go on
    assert longer.best_step == 4 and not longer.stopped_early


def test_best_checkpoint_is_pinned_exported_and_survives_a_stop_between_evaluations(tmp_path, tiny_model, demo_files,
                                                                                   clean_env):
    """--select_best loss with keep_last 1: the best step's checkpoint is kept and exported; a run stopped
    by a signal between two evaluations and resumed selects the same step with the same value."""
    kw = dict(select_best="loss", early_stopping_patience=2, eval_steps=2, keep_last=1, learning_rate=0.05,
              num_epochs=3)
    full = Trainer(mlm_cfg(tmp_path / "full", tiny_model, demo_files, **kw), MLM)
    summary = full.run()
    sel = summary["selected"]
    evals = [r for r in records(tmp_path / "full") if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])  # the first of equal values: strict improvement only
    assert (sel["metric"], sel["step"], sel["value"]) == ("loss", best["step"], best["eval_loss"])
    assert sel["evaluations"] == len(evals) and summary["checkpoint"].endswith(f"step{best['step']:07d}")
    after_best = [r for r in evals if r["step"] > best["step"]]
    if sel["stopped_early"]:  # exactly `patience` evaluations without improvement, then the end
        assert len(after_best) == 2 and summary["steps"] < full.total_steps
    else:
        assert len(after_best) < 2 and summary["steps"] == full.total_steps
    kept = {p.name for p in (tmp_path / "full" / "checkpoints").iterdir() if p.is_dir()}
    assert f"step{best['step']:07d}" in kept and len(kept) <= 2  # keep_last 1 + the pinned best
    # the engine was given the best weights back before the export check: exported == best, exactly
    assert summary["export_max_abs_logit_diff"] <= 1e-6
    card = (tmp_path / "full" / "model" / "README.md").read_text()
    assert f"by held-out loss ({best['eval_loss']:.6g} at step {best['step']}" in card

    os.environ["DAPT_FAULT"] = "signal=train:0:2"  # during step 3: between the evaluations at steps 2 and 4
    with pytest.raises(StopRequested):
        Trainer(mlm_cfg(tmp_path / "split", tiny_model, demo_files, **kw), MLM).run()
    del os.environ["DAPT_FAULT"]
    resumed = Trainer(mlm_cfg(tmp_path / "split", tiny_model, demo_files, **kw), MLM).run()
    def same(selected: dict) -> dict:  # what must agree (not the path, not the evaluation's timing)
        return {**selected, "checkpoint": Path(selected["checkpoint"]).name,
                "eval": {k: v for k, v in selected["eval"].items() if k != "eval_seconds"}}

    assert same(resumed["selected"]) == same(sel)
    assert resumed["steps"] == summary["steps"]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out) if "loss" in r]


def test_optimizer_choices_and_gradient_checkpointing_train_the_same_run(tmp_path, tiny_model, demo_files, clean_env):
    """torch's AdamW (auto on CPU) and DeepSpeed's CPU Adam train one run to the same per-step losses within
    1e-4 (relative); gradient checkpointing recomputes the same activations under the same dropout masks, so
    its losses agree to float rounding (1e-5)."""
    def run(name: str, **kw) -> tuple[list[float], dict]:
        out = tmp_path / name
        Trainer(mlm_cfg(out, tiny_model, demo_files, num_epochs=1, logging_steps=1, **kw), MLM).run()
        return _losses(out), json.loads((out / "run_config.json").read_text())

    base, base_cfg = run("auto")
    cpu_adam, cpu_adam_cfg = run("cpu_adam", optimizer="cpu_adam")
    ckpt, ckpt_cfg = run("checkpointing", gradient_checkpointing=True)
    assert base_cfg["optimizer"] == "torch_adamw" and cpu_adam_cfg["optimizer"] == "cpu_adam"
    assert ckpt_cfg["config"]["gradient_checkpointing"] is True
    assert len(base) == len(cpu_adam) == len(ckpt) >= 5
    assert base != [base[0]] * len(base)  # it trains: the losses move
    for a, b, c in zip(base, cpu_adam, ckpt):
        assert abs(a - b) <= 1e-4 * abs(a), (base, cpu_adam)
        assert abs(a - c) <= 1e-5 * abs(a), (base, ckpt)
