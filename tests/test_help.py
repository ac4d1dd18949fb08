"""--help explains every flag: its meaning, default and allowed values come from one place, the config
field's metadata (dapt/config.py `flag`), for every stage and for prepare's own flags. In-process."""
from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from dapt.config import (
    STAGE_CONFIGS,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    MLMConfig,
    TrainConfig,
    parse_config,
)
from dapt.errors import DaptError
from dapt.jobs.prepare import PrepareOptions

CONFIG_CLASSES = [DataConfig, TrainConfig, *STAGE_CONFIGS.values(), PrepareOptions]


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help", "")
        assert len(text.split()) >= 2, f"{cls.__name__}.{f.name} has no help text"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        choices = f.metadata["choices"]
        # a closed set allows its default, or the field is required, or "" means "as the model was trained"
        assert not choices or default in choices or text.endswith("(required)") or (default == "" and '""' in text), \
            (cls.__name__, f.name)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_meaning_is_not_also_in_comments(cls):
    """One source: a field's meaning sits in its help metadata, not in a `#` comment beside it."""
    source = inspect.getsource(cls)
    comments = [line.strip() for line in source.splitlines() if re.match(r"\s*#", line) or "  # " in line]
    assert comments == []


def help_text(main, argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # one line per flag and its help, wherever the test runs
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def flag_help(text: str, flag: str) -> str:
    """The invocation and help of one flag (argparse may put the help on the next line)."""
    match = re.search(rf"^  {re.escape(flag)}\b(.*(?:\n {{20,}}\S.*)*)", text, re.M)
    assert match, f"{flag} not in --help"
    return " ".join(match.group(0).split())


def test_mlm_help_shows_meaning_default_and_choices(capsys, monkeypatch):
    from dapt.commands import mlm

    text = help_text(mlm.main, [], capsys, monkeypatch)
    assert "usage: mlm" in text and "masked-language-model" in text
    assert "data options:" in text and "training options:" in text and "mlm options:" in text
    opt = flag_help(text, "--optimizer")
    assert opt.startswith("--optimizer {auto,torch_adamw,fused_adam,cpu_adam} AdamW")
    assert opt.endswith("(default: auto)")
    assert "JIT-built on first use" in opt  # the meaning, as it was written in the comment beside the field
    lr = flag_help(text, "--learning_rate")
    assert lr.startswith("--learning_rate FLOAT peak learning rate") and lr.endswith("(default: 2e-05)")
    assert flag_help(text, "--warmup").endswith("fraction of all optimizer steps (default: 500)")  # MLM's default
    packing = flag_help(text, "--packing")
    assert packing.startswith("--packing [{true,false}]") and packing.endswith("(default: true)")
    assert flag_help(text, "--gradient_checkpointing").endswith("~30% more compute) (default: false)")
    assert flag_help(text, "--select_best").startswith("--select_best {none,loss} ")  # this stage's metrics
    assert flag_help(text, "--attn_implementation").startswith("--attn_implementation {auto,sdpa,eager,chunked}")
    assert flag_help(text, "--data_files").endswith("(default: none)")
    out = flag_help(text, "--output_dir")
    assert out.endswith("(required)") and "default" not in out
    assert "--local_rank" not in text
    # every field of the stage is listed, each with words after it
    for f in dataclasses.fields(MLMConfig):
        assert len(flag_help(text, f"--{f.name}").split()) > 3, f.name


def test_other_stages_show_their_own_choices(capsys, monkeypatch):
    from dapt.commands import evaluate, export, finetune

    text = help_text(finetune.main, [], capsys, monkeypatch)
    assert flag_help(text, "--truncation").startswith("--truncation {head,head+tail} head: keep the first tokens")
    assert flag_help(text, "--truncation").endswith("(default: head+tail)")
    assert flag_help(text, "--select_best").startswith("--select_best {none,accuracy,f1_macro} ")
    text = help_text(evaluate.main, [], capsys, monkeypatch)
    assert flag_help(text, "--precision").startswith("--precision {auto,fp32,fp16,bf16} ")
    assert flag_help(text, "--truncation").endswith('"" = as the model was trained (default: "")')
    assert flag_help(text, "--max_seq_length").endswith("as the model was trained (stored in its config) (default: 0)")
    text = help_text(export.main, [], capsys, monkeypatch)
    assert flag_help(text, "--overwrite_output_dir").startswith("--overwrite_output_dir [{true,false}] replace")


def test_prepare_help_with_and_without_a_stage(capsys, monkeypatch):
    from dapt.commands import prepare

    text = help_text(prepare.main, [], capsys, monkeypatch)
    assert flag_help(text, "--stage").startswith("--stage {mlm,finetune,evaluate} the stage")
    assert flag_help(text, "--test_split").endswith("(default: test)")
    assert "--stage STAGE --help" in text and "--learning_rate" not in text
    text = help_text(prepare.main, ["--stage", "finetune"], capsys, monkeypatch)
    assert "prepare options:" in text and "--test_files" in text
    assert flag_help(text, "--truncation").startswith("--truncation {head,head+tail}")


def test_help_choices_are_what_validation_accepts():
    """The values --help lists are the ones the check allows, from a flag or a recipe alike."""
    for cls, stage, name in [(FinetuneConfig, "finetune", "select_best"), (MLMConfig, "mlm", "select_best"),
                             (MLMConfig, "mlm", "progress"), (FinetuneConfig, "finetune", "optimizer")]:
        choices = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]
        for value in choices:
            assert getattr(parse_config(cls, stage, ["--output_dir", "o", f"--{name}", value]), name) == value
        with pytest.raises(DaptError, match=f"{name} must be one of {', '.join(choices)}"):
            parse_config(cls, stage, ["--output_dir", "o", f"--{name}", "nope"])
    with pytest.raises(DaptError, match="precision must be one of auto, fp32, fp16, bf16, got 'fp8'"):
        parse_config(EvalConfig, "evaluate", ["--output_dir", "o", "--model_name_or_path", "m", "--precision", "fp8"])


@pytest.mark.parametrize("command", ["report", "summarize", "predict", "demo", "pipeline", "plan"])
def test_commands_own_flags_have_help_and_defaults(command, capsys, monkeypatch):
    import importlib

    main = importlib.import_module(f"dapt.commands.{command}").main
    text = help_text(main, [], capsys, monkeypatch)
    for line in re.findall(r"^  (-.*)$", text, re.M):
        flag = line.split()[0].rstrip(",")
        if flag != "-h":
            assert len(flag_help(text, flag).split()) > 2, f"{command} {flag} has no help"
    if command == "predict":
        assert flag_help(text, "--batch_size").endswith("texts per forward pass (default: 32)")
        assert flag_help(text, "--format").startswith("--format {jsonl,table} jsonl:")
    if command == "plan":
        assert flag_help(text, "--stage").startswith("--stage {mlm,finetune,all} the stage(s) to plan (default: all)")
    assert "(default: None)" not in text and "(default: False)" not in text
