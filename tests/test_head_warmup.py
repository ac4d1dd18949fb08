"""Checkpoints without an MLM head (issue 22 item 1): the load names the head tensors that are new, and
--head_warmup_steps trains the head alone (encoder and embeddings frozen, bit for bit) before everything.

In this process (a world of one): detection, the freeze under ZeRO-2 and ZeRO-3, the fresh Adam the frozen
groups start at the switch, the held-out loss logged there, and the input errors. On 2 forked ranks: a run
stopped inside the warm-up, at the switch or after it and resumed is the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import ROOT, assert_ok, run_cli
from test_trainer import mlm_cfg as trainer_mlm_cfg
from test_trainer import records

from dapt.config import FinetuneConfig, MLMConfig, head_warmup_steps, parse_config
from dapt.distributed import setup_distributed, shutdown
from dapt.errors import DaptError, StopRequested
from dapt.jobs.trainer import Trainer
from dapt.model.loading import load_mlm_model_and_head, summarise_names
from dapt.train.head_warmup import FROZEN_KEY
from dapt.train.tasks import MLM

pytestmark = pytest.mark.filterwarnings("ignore")
EXIT_REQUEUE = 75
NEW_HEAD = ("mlm head: 5 tensors newly initialised (cls.predictions.bias, "
            "cls.predictions.transform.dense.{weight,bias}, cls.predictions.transform.LayerNorm.{weight,bias}); "
            "the decoder is tied to the word embeddings")


@pytest.fixture(scope="module")
def headless_model(tmp_path_factory, tiny_model):
    """The tiny BERT saved as a plain BertModel: an encoder published without its MLM head, as a sentence
    encoder is."""
    from transformers import AutoTokenizer, BertForMaskedLM

    out = tmp_path_factory.mktemp("headless")
    BertForMaskedLM.from_pretrained(tiny_model).bert.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world_of_one():
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DAPT_FAULT"):
        os.environ.pop(key, None)
    os.environ.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    info = setup_distributed()
    yield info
    shutdown()
    forget_deepspeed_groups()
    os.environ.clear()
    os.environ.update(saved)


def forget_deepspeed_groups() -> None:
    """DeepSpeed caches the process groups it derives (deepspeed.utils.groups): a later world of one in this
    process (tests/test_trainer.py) must not be handed those of the group just destroyed."""
    from deepspeed.utils import groups
    from torch.distributed import ProcessGroup

    for name, value in list(vars(groups).items()):
        if isinstance(value, ProcessGroup):
            setattr(groups, name, None)
        elif name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")) and isinstance(value, dict):
            value.clear()


def mlm_cfg(out, model, demo_files, **kw) -> MLMConfig:
    """test_trainer's in-process MLM config, logging every step (the switch step must be in the log)."""
    return trainer_mlm_cfg(out, model, demo_files, **{"logging_steps": 1, **kw})


# --- detection ------------------------------------------------------------------------------------

def test_the_load_names_the_new_head_tensors(headless_model, tiny_model):
    _, report = load_mlm_model_and_head(str(headless_model))
    assert report.line() == NEW_HEAD
    assert report.new == report.head and report.tied_decoder
    _, full = load_mlm_model_and_head(str(tiny_model))  # a full BERT checkpoint: nothing to say
    assert full.new == [] and full.line() is None and full.head == report.head
    assert summarise_names(["a.b.weight", "a.b.bias", "a.c", "d"]) == "a.b.{weight,bias}, a.c, d"


# --- the freeze, the switch, the schedule ---------------------------------------------------------

def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full value (ZeRO-3 gathers its partitions; a no-op for ZeRO-1/2)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("ds", ["zero2_auto", "zero3_auto"])
def test_warmup_freezes_the_encoder_bit_for_bit_then_trains_everything(ds, tmp_path, headless_model, demo_files,
                                                                         world_of_one, capsys):
    warm = 3
    trainer = Trainer(mlm_cfg(tmp_path / "run", headless_model, demo_files, head_warmup_steps=warm,
                              ds_config=str(ROOT / "ds_configs" / f"{ds}.json")), MLM)
    snapshots, adam_at_switch = {}, []
    train_step = trainer.train_step

    def step_with_snapshots(*args, **kwargs):
        step = trainer.position.step
        if step in (0, warm, warm + 1):
            snapshots[step] = full_params(trainer.engine)
        if step == warm and ds == "zero2_auto":  # the frozen groups' Adam, as the switch finds it
            base = trainer.engine.optimizer.optimizer
            adam_at_switch.extend(base.state[p] for g in base.param_groups if g[FROZEN_KEY] for p in g["params"])
            adam_at_switch[:] = [{k: v.clone() for k, v in s.items()} for s in adam_at_switch]
        return train_step(*args, **kwargs)

    trainer.train_step = step_with_snapshots
    summary = trainer.run()
    out = capsys.readouterr().out
    head = set(trainer.head_report.head)
    before, switch, after = snapshots[0], snapshots[warm], snapshots[warm + 1]
    frozen = [n for n in before if n not in head]
    assert len(head) == 5 and len(frozen) == len(before) - 5
    # steps 1..warm: the encoder and the (tied) word embeddings do not move at all; the head does
    assert all(torch.equal(before[n], switch[n]) for n in frozen)
    assert all(not torch.equal(before[n], switch[n]) for n in head)
    # the first step after the switch moves everything
    assert all(not torch.equal(switch[n], after[n]) for n in before)
    if ds == "zero2_auto":
        # the frozen groups start at the switch as a fresh Adam: no steps counted, moments 0
        assert adam_at_switch and all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
                                      for s in adam_at_switch)
        base = trainer.engine.optimizer.optimizer
        steps = {g[FROZEN_KEY]: float(base.state[g["params"][0]]["step"]) for g in base.param_groups}
        assert steps == {True: trainer.total_steps - warm, False: trainer.total_steps}
    # the held-out loss of the head trained alone, logged at the switch
    logged = records(tmp_path / "run")
    at_switch = [r for r in logged if r.get("head_warmup_end")]
    assert [r["step"] for r in at_switch] == [warm] and at_switch[0]["eval_loss"] > 0
    assert f"[mlm] head warm-up done after step {warm}: held-out loss {at_switch[0]['eval_loss']:.4f}" in out
    assert NEW_HEAD + "; head warm-up: steps 1-3 train only the head" in out
    # the warm-up steps are part of the one schedule: warmup over 2 steps, then linear decay
    total = trainer.total_steps
    for r in (r for r in logged if "loss" in r):
        i = r["step"] - 1
        assert abs(r["lr"] - (1e-3 * i / 2 if i < 2 else 1e-3 * (total - i) / (total - 2))) < 1e-12
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["head_warmup_steps"] == warm and run_config["mlm_head"]["new_tensors"] == trainer.head_report.new
    assert summary["export_max_abs_logit_diff"] <= 1e-4


def test_a_full_checkpoint_prints_nothing_and_a_fraction_counts_steps(tmp_path, tiny_model, demo_files, world_of_one,
                                                                      capsys):
    trainer = Trainer(mlm_cfg(tmp_path / "run", tiny_model, demo_files, num_epochs=1, head_warmup_steps=0.25), MLM)
    trainer.run()
    out = capsys.readouterr().out
    warm = trainer.head_warmup
    assert warm == int(0.25 * trainer.total_steps) >= 1
    assert f"mlm head: loaded from the checkpoint; head warm-up: steps 1-{warm} train only the head" in out
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["mlm_head"]["new_tensors"] == []
    assert [r["step"] for r in records(tmp_path / "run") if r.get("head_warmup_end")] == [warm]
    assert head_warmup_steps(MLMConfig(output_dir="o", head_warmup_steps=0.001), 100) == 1
    assert head_warmup_steps(FinetuneConfig(output_dir="o"), 100) == 0


# --- input errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("-1", "head_warmup_steps must be a step count (>= 1), a fraction in (0, 1) or 0 (off), got -1"),
    ("2.5", "head_warmup_steps must be a step count (>= 1), a fraction in (0, 1) or 0 (off), got 2.5"),
])
def test_bad_values_are_one_line(value, message):
    with pytest.raises(DaptError) as err:
        parse_config(MLMConfig, "mlm", ["--output_dir", "o", "--head_warmup_steps", value])
    assert str(err.value) == message


def test_finetune_names_the_stage_the_flag_belongs_to(capsys):
    from dapt.commands import finetune

    with pytest.raises(SystemExit) as exit_:
        finetune.main(["--output_dir", "o", "--head_warmup_steps", "5"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("dapt: error: finetune: unrecognized arguments: --head_warmup_steps 5 "
                                       "(--head_warmup_steps is an option of mlm only)\n")


def test_a_warmup_as_long_as_the_run_exits_2(tmp_path, headless_model, demo_files, world_of_one, capsys):
    from dapt.commands import mlm

    argv = ["--output_dir", tmp_path / "run", "--model_name_or_path", headless_model, "--data_files",
            demo_files["unlabelled"], "--ds_config", "zero2_auto", "--max_seq_length", "32", "--max_samples", "60",
            "--effective_batch_size", "8", "--micro_batch_size", "2", "--num_epochs", "1", "--validation_split", "0.1",
            "--wandb_mode", "disabled", "--head_warmup_steps", "9"]  # 79 blocks / 8 a step = 9 steps
    with pytest.raises(SystemExit) as exit_:
        mlm.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err == ("dapt: error: head_warmup_steps 9 is 9 optimizer steps, not fewer than the run's 9 (9 steps/epoch "
                   "x 1 epochs): the encoder would never train\n")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resuming_with_another_warmup_is_refused(tmp_path, headless_model, demo_files, world_of_one):
    os.environ["DAPT_FAULT"] = "signal=train:0:1"
    try:
        with pytest.raises(StopRequested):
            Trainer(mlm_cfg(tmp_path / "run", headless_model, demo_files, head_warmup_steps=4), MLM).run()
    finally:
        del os.environ["DAPT_FAULT"]
    with pytest.raises(DaptError, match=r"step0000002 was trained with 4 head warm-up steps; this run has 6 "
                                        r"\(head_warmup_steps 6\): resume with the same value or start a new run"):
        Trainer(mlm_cfg(tmp_path / "run", headless_model, demo_files, head_warmup_steps=6), MLM).run()


# --- stop and resume across the switch, 2 forked ranks --------------------------------------------

def _args(out, model, demo_files, ds, warm):
    return ["--model_name_or_path", model, "--data_files", demo_files["unlabelled"], "--output_dir", out,
            "--ds_config", f"ds_configs/{ds}.json", "--max_seq_length", "64", "--num_epochs", "2",
            "--learning_rate", "1e-3", "--warmup", "0.1", "--validation_split", "0.1", "--effective_batch_size", "16",
            "--micro_batch_size", "4", "--logging_steps", "1", "--seed", "3", "--save_steps", "4",
            "--head_warmup_steps", warm]


WARM = 7  # of 18 steps (9 a epoch x 2 epochs); epoch 1 ends at step 9
_references: dict[str, list[dict]] = {}


def _reference(ds, tmp_path_factory, model, demo_files, env) -> list[dict]:
    if ds not in _references:
        out = tmp_path_factory.mktemp(f"reference_{ds}")
        assert_ok(run_cli("mlm.py", _args(out, model, demo_files, ds, WARM), env, ranks=2, launcher="fork"))
        _references[ds] = records(out)
    return _references[ds]


@pytest.mark.dist
@pytest.mark.resume
@pytest.mark.parametrize("ds, stop_at", [("zero3_auto", 4), ("zero2_auto", WARM), ("zero2_auto", WARM + 3)],
                         ids=["inside-zero3", "at-the-switch-zero2", "after-zero2"])
def test_stop_and_resume_across_the_switch_is_the_same_run(ds, stop_at, tmp_path, tmp_path_factory, headless_model,
                                                           demo_files, base_env):
    ref = _reference(ds, tmp_path_factory, headless_model, demo_files, base_env)
    ref_losses = {r["step"]: r["loss"] for r in ref if "loss" in r}
    assert max(ref_losses) == 18 and [r["step"] for r in ref if r.get("head_warmup_end")] == [WARM]

    run = tmp_path / "run"
    args = _args(run, headless_model, demo_files, ds, WARM)
    first = run_cli("mlm.py", args, {**base_env, "DAPT_FAULT": f"signal=train:0:{stop_at - 1}"}, ranks=2,
                    launcher="fork")
    assert first.returncode == EXIT_REQUEUE, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"stopped by signal {int(signal.SIGUSR1)} at step {stop_at}" in first.stdout
    second = run_cli("mlm.py", args, base_env, ranks=2, launcher="fork")
    assert_ok(second)
    assert f"at step {stop_at}" in second.stdout
    assert ("head warm-up done" in second.stdout) == (stop_at < WARM)  # the switch happens once, in its job
    got = records(run)
    losses = {r["step"]: r["loss"] for r in got if "loss" in r}
    assert sorted(losses) == sorted(ref_losses)
    worst = max(abs(losses[s] - ref_losses[s]) for s in losses)
    assert worst <= 1e-6, worst
    ref_evals = [(r["step"], r["eval_loss"], r.get("head_warmup_end")) for r in ref if "eval_loss" in r]
    evals = [(r["step"], r["eval_loss"], r.get("head_warmup_end")) for r in got if "eval_loss" in r]
    assert [e[0::2] for e in evals] == [e[0::2] for e in ref_evals]
    assert max(abs(a[1] - b[1]) for a, b in zip(evals, ref_evals)) <= 1e-6
