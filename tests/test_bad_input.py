"""Bad input: one clear line, exit code 2, and an existing good output left exactly as it was (even with
--overwrite_output_dir, nothing is touched before validation).

Every case runs the real command (dapt.commands.finetune.main, the function launch/finetune.py calls) in
this process; two of them also run through the real entry point as a subprocess, for the process-level
contract (exit status, no traceback, one line on stderr)."""
import hashlib
import json
import os

import pytest
from conftest import assert_ok, run_cli

from dapt.commands import finetune


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def good_output(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text('{"good": true}')
    (out / "eval_results.json").write_text('{"accuracy": 0.95}')
    return out


def _error_line(proc):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dapt: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


CASES = {
    "missing text column": ({"review": "great", "label": 1}, [], "missing column 'text'"),
    "missing label column": ({"text": "great"}, [], "missing column 'label'"),
    "empty text": ({"text": "  ", "label": 1}, [], "1 empty or non-text value(s) in column 'text'"),
    "label outside 0/1": ({"text": "great", "label": 3}, [], r"label(s) outside {0, 1} in column 'label'"),
    "unknown ds key": ({"text": "great", "label": 1}, ["ds:unknown"], "unknown key 'zero_optimisation'"),
    "conflicting ds value": ({"text": "great", "label": 1}, ["ds:conflict"],
                             "sets train_batch_size=32 but the training config gives 16"),
    "model path missing": ({"text": "great", "label": 1}, ["--model_name_or_path", "./no/such/model"],
                           "model path does not exist: ./no/such/model"),
}


def _case_args(case, tmp_path, good_output, tiny_model):
    row, extra, message = CASES[case]
    rows = [{"text": "a fine film", "label": 0}] * 20 + [row] + [{"text": "a bad film", "label": 1}] * 20
    if case.startswith("missing"):  # a column absent from the whole file
        rows = [{k: v for k, v in row.items()} for _ in range(41)]
    data = _jsonl(tmp_path / "train.jsonl", rows)
    ds = "ds_configs/zero2_auto.json"
    if extra[:1] == ["ds:unknown"]:
        ds = tmp_path / "ds.json"
        ds.write_text('{"zero_optimisation": {"stage": 2}}')
        extra = []
    elif extra[:1] == ["ds:conflict"]:
        ds = tmp_path / "ds.json"
        ds.write_text('{"zero_optimization": {"stage": 2}, "train_batch_size": 32}')
        extra = []
    args = ["--model_name_or_path", tiny_model, "--data_files", data, "--output_dir", good_output,
            "--overwrite_output_dir", "--ds_config", ds, "--max_seq_length", "32", "--effective_batch_size", "16",
            "--micro_batch_size", "4", "--num_epochs", "1", "--head_tokens", "8", *extra]
    return [str(a) for a in args], message


@pytest.fixture
def in_process_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # set by a world-of-one start-up inside the command


@pytest.mark.parametrize("case", list(CASES))
def test_finetune_rejects_bad_input(case, tmp_path, good_output, tiny_model, in_process_env, capsys):
    args, message = _case_args(case, tmp_path, good_output, tiny_model)
    before = _snapshot(good_output)
    with pytest.raises(SystemExit) as exit_:
        finetune.main(args)
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dapt: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert _snapshot(good_output) == before


@pytest.mark.parametrize("case", ["unknown ds key", "empty text"])  # before and after the process group starts
def test_the_entry_point_exits_2_with_one_line(case, tmp_path, good_output, tiny_model, base_env):
    args, message = _case_args(case, tmp_path, good_output, tiny_model)
    before = _snapshot(good_output)
    line = _error_line(run_cli("finetune.py", args, base_env))
    assert message in line
    assert _snapshot(good_output) == before


def test_existing_run_is_not_overwritten(tmp_path, good_output, tiny_model, base_env, demo_files):
    before = _snapshot(good_output)
    line = _error_line(run_cli("mlm.py", ["--model_name_or_path", tiny_model, "--data_files", demo_files["unlabelled"],
                                          "--output_dir", good_output, "--max_seq_length", "64"], base_env, launcher="fork"))
    assert "is not empty" in line and "--overwrite_output_dir" in line
    line = _error_line(run_cli("evaluate.py", ["--model_name_or_path", tiny_model, "--data_files", demo_files["test"],
                                               "--output_dir", good_output], base_env, launcher="fork"))
    assert "eval_results.json already exists" in line
    assert _snapshot(good_output) == before


def test_export_refuses_bad_checkpoints(tmp_path, good_output, base_env):
    line = _error_line(run_cli("export.py", ["--checkpoint", tmp_path / "nothing", "--output_dir", tmp_path / "x"],
                               base_env, launcher="fork"))
    assert "checkpoint not found" in line
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("step0000009")
    line = _error_line(run_cli("export.py", ["--checkpoint", tmp_path / "ck", "--output_dir", tmp_path / "x"],
                               base_env, launcher="fork"))
    assert "names checkpoint 'step0000009', which does not exist" in line


def test_a_good_small_run_passes_the_same_checks(tmp_path, tiny_model, base_env, demo_files):
    """The control for the cases above: the same command with good input trains and exports."""
    out = tmp_path / "ok"
    proc = run_cli("finetune.py", ["--model_name_or_path", tiny_model, "--data_files", demo_files["train"],
                                   "--output_dir", out, "--ds_config", "ds_configs/zero2_auto.json",
                                   "--max_seq_length", "64", "--effective_batch_size", "16", "--micro_batch_size",
                                   "8", "--num_epochs", "1", "--head_tokens", "16"], base_env, launcher="fork")
    assert_ok(proc)
    assert (out / "model" / "model.safetensors").is_file()
