import json

import pytest
from conftest import ROOT

from dapt.config import EvalConfig, FinetuneConfig, MLMConfig, parse_config, warmup_steps
from dapt.errors import DaptError
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
    ("finetune", ["--num_workers", "-1"], "num_workers must be >= 0, got -1"),
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
    from dapt.data.prepare import prepare

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


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_effective_batch_is_fixed_across_world_sizes(world, accum):
    cfg = MLMConfig(output_dir="o")
    path = "ds_configs/zero2_auto.json"
    ds = build_ds_config(cfg, load_ds_config(path), path, world, 1000)
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == 64 == ds["train_micro_batch_size_per_gpu"] * accum * world
    assert ds["optimizer"]["params"]["lr"] == 2e-5 and ds["scheduler"]["params"]["warmup_num_steps"] == 500
    assert ds["scheduler"]["params"]["total_num_steps"] == 1000


def test_indivisible_batch_is_an_error():
    cfg = MLMConfig(output_dir="o", effective_batch_size=64, micro_batch_size=16)
    with pytest.raises(DaptError, match="not divisible by micro_batch_size 16 x world size 3"):
        build_ds_config(cfg, load_ds_config("ds_configs/zero2_auto.json"), "x", 3, 100)


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
        build_ds_config(cfg, load_ds_config(path), path, 1, 10)
    with pytest.raises(DaptError, match="zero_optimization.stage must be 1, 2 or 3 \\(got 0\\)"):
        load_ds_config(_ds(tmp_path, {"zero_optimization": {"stage": 0}}))
    with pytest.raises(DaptError, match="stage must be 1, 2 or 3 \\(got 0\\)"):
        load_ds_config(_ds(tmp_path, {"bf16": {"enabled": True}}))  # no ZeRO section: stage 0
    path = _ds(tmp_path, {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 1}})
    with pytest.raises(DaptError, match="sets 'optimizer'"):
        build_ds_config(cfg, load_ds_config(path), path, 1, 10)
    # the same value, or "auto", is not a conflict
    path = _ds(tmp_path, {"train_batch_size": 64, "gradient_accumulation_steps": "auto", "_doc": "comment",
                          "zero_optimization": {"stage": 2}})
    assert build_ds_config(cfg, load_ds_config(path), path, 1, 10)["gradient_accumulation_steps"] == 4


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
