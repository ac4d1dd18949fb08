import json

import pytest
from conftest import ROOT

from dapt.config import EvalConfig, FinetuneConfig, MLMConfig, parse_config, warmup_steps
from dapt.errors import DaptError
from dapt.train.batch_plan import plan_batch
from dapt.train.engine import build_ds_config, load_ds_config, resolve_precision


def test_defaults_are_the_reference_recipe():
    cfg = parse_config(MLMConfig, "mlm", ["--output_dir", "o"])
    assert (cfg.model_name_or_path, cfg.effective_batch_size, cfg.micro_batch_size) == ("bert-base-uncased", 64, 16)
    assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay) == \
        (2e-5, 0.9, 0.999, 1e-8, 0.01)
    assert (cfg.num_epochs, warmup_steps(cfg, 10_000), cfg.mlm_probability, cfg.max_seq_length) == (3, 500, 0.15, 512)
    ft = parse_config(FinetuneConfig, "finetune", ["--output_dir", "o"])
    assert (ft.truncation, ft.head_tokens, warmup_steps(ft, 1000)) == ("head+tail", 128, 0)


def test_recipe_sections_and_cli_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1.0e-4\nmlm_probability: 0.2\nmlm:\n  num_epochs: 2\nfinetune:\n  num_epochs: 5\n")
    mlm = parse_config(MLMConfig, "mlm", ["--config", str(recipe), "--output_dir", "o", "--num_epochs", "4"])
    assert (mlm.learning_rate, mlm.mlm_probability, mlm.num_epochs) == (1e-4, 0.2, 4)
    ft = parse_config(FinetuneConfig, "finetune", ["--config", str(recipe), "--output_dir", "o"])
    assert (ft.learning_rate, ft.num_epochs) == (1e-4, 5)  # mlm_probability is not a fine-tune field
    assert warmup_steps(parse_config(FinetuneConfig, "finetune", ["--output_dir", "o", "--warmup", "0.1"]), 200) == 20


@pytest.mark.parametrize("argv, message", [
    (["--output_dir", "o", "--lerning_rate", "1"], "unrecognized arguments: --lerning_rate"),
    (["--output_dir", "o", "--num_epochs", "two"], "'num_epochs' expects int"),
    (["--num_epochs", "2"], "--output_dir is required"),
    (["--output_dir", "o", "--mlm_probability", "1.5"], "mlm_probability must be in"),
    (["--output_dir", "o", "--warmup", "2.5"], "warmup must be"),
])
def test_bad_flags(argv, message):
    with pytest.raises(DaptError, match=message):
        parse_config(MLMConfig, "mlm", argv)


# Every numeric flag's range, in every stage: one line naming the flag, before anything runs.
RANGE_CASES = [
    ("evaluate", ["--eval_batch_size", "0"], "eval_batch_size must be >= 1, got 0"),
    ("evaluate", ["--max_seq_length", "4"], "max_seq_length must be >= 8 (0 = as trained, evaluation only), got 4"),
    ("evaluate", ["--head_tokens", "-1"], "head_tokens must be >= 0, got -1"),
    ("evaluate", ["--num_proc", "0"], "num_proc must be >= 1, got 0"),
    ("finetune", ["--eval_batch_size", "0"], "eval_batch_size must be >= 1, got 0"),
    ("finetune", ["--micro_batch_size", "0"], "micro_batch_size must be >= 1, got 0"),
    ("finetune", ["--keep_last", "0"], "keep_last must be >= 1, got 0"),
    ("finetune", ["--save_steps", "-5"], "save_steps must be >= 0, got -5"),
    ("finetune", ["--num_workers", "-2"], "num_workers must be >= -1 (-1 = auto), got -2"),
    ("finetune", ["--optimizer", "sgd"], "optimizer must be one of auto, torch_adamw, fused_adam, cpu_adam, got 'sgd'"),
    ("finetune", ["--adam_beta1", "1.0"], "adam_beta1 must be in [0, 1), got 1.0"),
    ("finetune", ["--adam_epsilon", "0"], "adam_epsilon must be > 0, got 0.0"),
    ("finetune", ["--weight_decay", "-0.1"], "weight_decay must be >= 0, got -0.1"),
    ("finetune", ["--seed", "-1"], "seed must be in [0, 4294967296), got -1"),
    ("finetune", ["--max_samples", "-3"], "max_samples must be >= 0 (0 = all), got -3"),
    ("mlm", ["--logging_steps", "0"], "logging_steps must be >= 1, got 0"),
    ("mlm", ["--eval_steps", "-1"], "eval_steps must be >= 0, got -1"),
    ("mlm", ["--peak_tflops", "-1"], "peak_tflops must be >= 0, got -1.0"),
    ("mlm", ["--max_seq_length", "0"], "max_seq_length must be >= 8, got 0"),
]


@pytest.mark.parametrize("stage, argv, message", RANGE_CASES)
def test_numeric_flags_are_range_checked(stage, argv, message):
    cls = {"mlm": MLMConfig, "finetune": FinetuneConfig, "evaluate": EvalConfig}[stage]
    extra = ["--model_name_or_path", "m"] if stage == "evaluate" else []
    with pytest.raises(DaptError) as err:
        parse_config(cls, stage, ["--output_dir", "o", *extra, *argv])
    assert str(err.value) == message


def test_length_beyond_the_models_positions_is_refused_up_front(tiny_model):
    """A long review would crash mid-run; the length is checked against the model before any data is read."""
    from dapt.model.settings import resolve_eval_settings

    cfg = parse_config(EvalConfig, "evaluate", ["--output_dir", "o", "--model_name_or_path", str(tiny_model),
                                                "--max_seq_length", "100000"])
    with pytest.raises(DaptError, match="max_seq_length 100000 exceeds the model's limit of 128 positions"):
        resolve_eval_settings(cfg, str(tiny_model))
    from dapt.commands.prepare import parse_args
    from dapt.jobs.prepare import prepare

    for stage in ("mlm", "finetune"):
        opts, stage_cfg = parse_args(["--stage", stage, "--output_dir", "o", "--model_name_or_path", str(tiny_model),
                                      "--data_files", "x.jsonl", "--max_seq_length", "100000"])
        with pytest.raises(DaptError, match="exceeds the model's limit of 128 positions"):
            prepare(opts, stage_cfg)


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mlm:\n  learning_rte: 1\n")
    with pytest.raises(DaptError, match="unknown field 'learning_rte' in section 'mlm'"):
        parse_config(MLMConfig, "mlm", ["--config", str(recipe), "--output_dir", "o"])


def _ds(tmp_path, obj):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(obj))
    return str(path)


def _plan(cfg, world):
    return plan_batch(cfg.effective_batch_size, cfg.micro_batch_size, world)


# The reference recipe (64 = 16 x accumulation x world) at every world size the launchers start.
@pytest.mark.parametrize("world, micro, accum", [(1, 16, 4), (2, 16, 2), (4, 16, 1), (8, 8, 1), (16, 4, 1),
                                                 (32, 2, 1), (64, 1, 1)])
def test_effective_batch_is_fixed_across_world_sizes(world, micro, accum):
    cfg = MLMConfig(output_dir="o")
    path = "ds_configs/zero2_auto.json"
    plan = _plan(cfg, world)
    ds = build_ds_config(cfg, load_ds_config(path), path, plan, 1000)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accum)
    assert ds["train_batch_size"] == 64 == micro * accum * world
    assert plan.shrunk == (micro != 16)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 500 and "optimizer" not in ds  # dapt builds it
    assert ds["scheduler"]["params"]["total_num_steps"] == 1000


def test_batch_plan_lines():
    note = plan_batch(64, 16, 8).note()
    assert note == ("micro_batch_size 16 -> 8: 16 exceeds each rank's share of the effective batch "
                    "(64 / 8 ranks = 8); accumulation 1")
    # a micro batch that does not divide the share shrinks to the largest that does (never above the budget)
    plan = plan_batch(64, 24, 1)
    assert (plan.micro, plan.accumulation) == (16, 4) and "does not divide" in plan.note()
    assert plan_batch(64, 16, 2).note() == ""
    assert plan_batch(96, 16, 12).as_dict() == {"effective": 96, "world_size": 12, "micro": 8, "accumulation": 1,
                                                "requested_micro": 16}


@pytest.mark.parametrize("world", [3, 6, 24, 48, 128])
def test_world_size_that_cannot_divide_the_batch_names_those_that_can(world):
    with pytest.raises(DaptError) as err:
        plan_batch(64, 16, world)
    assert str(err.value).startswith(f"effective_batch_size 64 cannot be split over {world} ranks: world sizes "
                                     "that can run it are 1, 2, 4, 8, 16, 32, 64")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("env, world", [
    ({"RANK": "3", "WORLD_SIZE": "8"}, 8),  # deepspeed, torchrun
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16"}, 16),  # mpirun
    ({"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "9"}, 8),  # srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, 1),  # the batch shell itself is no step task
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, 4),
    ({"PMIX_RANK": "1"}, None),  # only the MPI library knows
    ({}, 1),
])
def test_launcher_world_size_is_read_before_the_rendezvous(monkeypatch, env, world):
    from dapt.distributed import launcher_world_size

    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_ID",
                "SLURM_STEPID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "PMI_RANK", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launcher_world_size() == world


def test_recipe_on_an_impossible_world_size_fails_before_anything_runs(tmp_path, monkeypatch):
    """8 ranks take the recipe (micro 16 -> 8); 24 fail in check_inputs: before data, model or process group."""
    from dapt.train.tasks import MLM
    from dapt.jobs.trainer import Trainer

    cfg = MLMConfig(output_dir=str(tmp_path / "out"), model_name_or_path=str(ROOT / "tests"), ds_config="ds_configs/zero2_auto.json")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "24")
    with pytest.raises(DaptError, match="cannot be split over 24 ranks"):
        Trainer(cfg, MLM).check_inputs()
    assert not (tmp_path / "out").exists()


def test_every_shipped_ds_config_loads():
    names = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    for required in ("zero1_fp16.json", "zero2_fp16.json", "zero3_fp16.json", "zero2_bf16.json",
                     "zero3_bf16.json", "zero3_offload_fp16.json"):
        assert required in names
    for name in names:
        load_ds_config(f"ds_configs/{name}")


def test_ds_config_conflicts_and_unknown_keys(tmp_path):
    cfg = MLMConfig(output_dir="o")
    with pytest.raises(DaptError, match="unknown key 'zero_optimisation'"):
        load_ds_config(_ds(tmp_path, {"zero_optimisation": {"stage": 2}}))
    with pytest.raises(DaptError, match="zero_optimization.stagee"):
        load_ds_config(_ds(tmp_path, {"zero_optimization": {"stagee": 2}}))
    with pytest.raises(DaptError, match="unknown key 'fp16.enabeld'"):
        load_ds_config(_ds(tmp_path, {"fp16": {"enabeld": True}}))
    path = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}})
    with pytest.raises(DaptError, match="sets train_micro_batch_size_per_gpu=8 but the training config gives 16"):
        build_ds_config(cfg, load_ds_config(path), path, _plan(cfg, 1), 10)
    with pytest.raises(DaptError, match="zero_optimization.stage must be 1, 2 or 3 \\(got 0\\)"):
        load_ds_config(_ds(tmp_path, {"zero_optimization": {"stage": 0}}))
    with pytest.raises(DaptError, match="stage must be 1, 2 or 3 \\(got 0\\)"):
        load_ds_config(_ds(tmp_path, {"bf16": {"enabled": True}}))  # no ZeRO section: stage 0
    path = _ds(tmp_path, {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 1}})
    with pytest.raises(DaptError, match="sets 'optimizer'; the optimizer comes from the training config \\(--optimizer"):
        build_ds_config(cfg, load_ds_config(path), path, _plan(cfg, 1), 10)
    # the same value, or "auto", is not a conflict
    path = _ds(tmp_path, {"train_batch_size": 64, "gradient_accumulation_steps": "auto", "_doc": "comment",
                          "zero_optimization": {"stage": 2}})
    assert build_ds_config(cfg, load_ds_config(path), path, _plan(cfg, 1), 10)["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize("key, says", [
    ("activation_checkpointing", "use --gradient_checkpointing"),
    ("compile", "dapt does not compile the model"),
    ("wandb", "--wandb_mode"),
    ("elasticity", "planned per world size"),
    ("pipeline", "needs model or training-loop support"),
    ("sparse_attention", "needs model or training-loop support"),
])
def test_ds_keys_that_would_do_nothing_are_refused(tmp_path, key, says):
    path = _ds(tmp_path, {key: {"enabled": True}, "zero_optimization": {"stage": 2}})
    with pytest.raises(DaptError) as err:
        load_ds_config(path)
    assert f"'{key}'" in str(err.value) and says in str(err.value)


def test_precision_follows_the_accelerator(tmp_path):
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    auto = load_ds_config("ds_configs/zero2_auto.json")
    expected = "fp32" if acc.device_name() == "cpu" else ("bf16" if acc.is_bf16_supported() else "fp16")
    assert resolve_precision(auto, "auto") == expected
    fp16 = load_ds_config("ds_configs/zero2_fp16.json")
    if acc.is_fp16_supported():
        assert resolve_precision(fp16, "x") == "fp16"
    else:
        with pytest.raises(DaptError, match="enables fp16, which the .* accelerator does not support"):
            resolve_precision(fp16, "x")
    with pytest.raises(DaptError, match="enables both fp16 and bf16"):
        resolve_precision({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "x")


def test_shipped_bucket_sizes_let_bert_base_overlap_communication():
    """A reduce bucket larger than the model's gradients is one all-reduce after backward: nothing overlaps
    with compute, which is what multi-node runs pay for. Every shipped config cuts bert-base (110M) in >= 4."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    with torch.device("meta"):
        n = sum(p.numel() for p in BertForMaskedLM(BertConfig()).parameters())  # BertConfig() is bert-base
    assert 105e6 < n < 115e6
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        zero = load_ds_config(str(path))["zero_optimization"]
        assert n / zero["reduce_bucket_size"] >= 4, path.name
        assert n / zero.get("allgather_bucket_size", 5e7) >= 2, path.name
