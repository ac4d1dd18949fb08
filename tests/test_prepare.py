"""The prepare step: a prepared directory holds exactly what each stage computes itself, its manifest
is checked by the stages (a mismatch is one line naming what differs), nothing partial is written,
and a training run reads only the prepared directory with the network variables set offline."""
import json
import os
import shutil
import tarfile

import pytest
import torch
from conftest import SHARED_IMDB, assert_ok, run_cli
from test_sources import make_aclimdb

from dapt.commands.prepare import parse_args
from dapt.config import EvalConfig, FinetuneConfig, MLMConfig
from dapt.data.classify import tokenize_for_classification
from dapt.data.prepared import MANIFEST, load_prepared, stage_settings, vocab_hash
from dapt.data.sources import load_table
from dapt.distributed import DistInfo
from dapt.errors import DaptError
from dapt.jobs.prepare import prepare
from dapt.model.settings import resolve_eval_settings
from dapt.train.tasks import build_classification_task, build_mlm_task

pytestmark = pytest.mark.data
INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def run_prepare(*args):
    """The prepare step in this process (DaptError propagates instead of exiting)."""
    return prepare(*parse_args([str(a) for a in args]))


def rows(ds, columns):
    return [tuple(json.dumps(ds[c][i]) for c in columns) for i in range(len(ds))]


def test_finetune_prepared_equals_the_stage_and_manifest(tmp_path, tiny_model, tokenizer, demo_files):
    out = tmp_path / "prep"
    flags = ["--model_name_or_path", tiny_model, "--data_files", demo_files["train"], "--max_seq_length", 48,
             "--head_tokens", 12, "--validation_split", 0.1, "--seed", 7]
    manifest = run_prepare("--stage", "finetune", "--output_dir", out, *flags)
    cfg = FinetuneConfig(output_dir="run", model_name_or_path=str(tiny_model), data_files=[str(demo_files["train"])],
                         max_seq_length=48, head_tokens=12, validation_split=0.1, seed=7)
    own = build_classification_task(cfg, INFO, tokenizer)
    cfg.data_files, cfg.prepared_dir = [], str(out)
    prepared = build_classification_task(cfg, INFO, tokenizer)
    cols = ["input_ids", "label", "length", "truncated"]
    assert rows(prepared.train_data, cols) == rows(own.train_data, cols)
    assert rows(prepared.val_data, cols) == rows(own.val_data, cols)

    s = manifest["settings"]
    assert s == {"stage": "finetune", "tokenizer_vocab_hash": vocab_hash(tokenizer), "max_seq_length": 48,
                 "max_samples": 0, "packing": False, "truncation": "head+tail", "head_tokens": 12,
                 "validation_split": 0.1, "seed": 7}
    assert manifest["dapt_version"] and len(manifest["fingerprint"]) == 64 and manifest["packing"] is False
    assert manifest["tokenizer"]["name"] == str(tiny_model) and manifest["truncation"] == "head+tail"
    assert {k: v["examples"] for k, v in manifest["splits"].items()} == {"train": len(own.train_data),
                                                                          "validation": len(own.val_data)}
    train = manifest["splits"]["train"]
    assert train["negative"] + train["positive"] == train["examples"]
    assert 0 < train["truncated_share"] < 1 and train["tokens_p50"] <= train["tokens_p90"] <= train["tokens_max"]
    assert manifest["source"]["inputs"][0]["sha256"] and manifest["source"]["rows"] == 192
    assert json.loads((out / MANIFEST).read_text()) == manifest


def test_mlm_prepared_equals_the_stage(tmp_path, tiny_model, tokenizer, demo_files):
    out = tmp_path / "prep"
    manifest = run_prepare("--stage", "mlm", "--output_dir", out, "--model_name_or_path", tiny_model,
                           "--data_files", demo_files["unlabelled"], "--max_seq_length", 32, "--validation_split", 0.05)
    cfg = MLMConfig(output_dir="run", data_files=[str(demo_files["unlabelled"])], max_seq_length=32,
                    validation_split=0.05)
    own = build_mlm_task(cfg, INFO, tokenizer)
    cfg.data_files, cfg.prepared_dir = [], str(out)
    prepared = build_mlm_task(cfg, INFO, tokenizer)
    assert prepared.train_blocks["input_ids"] == own.train_blocks["input_ids"]
    assert prepared.val_blocks["input_ids"] == own.val_blocks["input_ids"]
    assert manifest["packing"] is True and manifest["settings"]["stage"] == "mlm"
    assert manifest["splits"]["train"]["blocks"] == len(own.train_blocks)
    assert manifest["splits"]["train"]["texts"] == 228  # 240 - round(240 * 0.05)


def test_evaluate_prepared_equals_the_evaluation_data(tmp_path, tiny_model, tokenizer, demo_files):
    out = tmp_path / "prep"
    run_prepare("--stage", "evaluate", "--output_dir", out, "--model_name_or_path", tiny_model,
                "--data_files", demo_files["test"], "--max_seq_length", 40, "--truncation", "head")
    cfg = EvalConfig(output_dir="ev", model_name_or_path=str(tiny_model), data_files=[str(demo_files["test"])],
                     max_seq_length=40, truncation="head")
    resolve_eval_settings(cfg, str(tiny_model))
    own = tokenize_for_classification(load_table(cfg, 0, "label"), tokenizer, 40, "head", cfg.head_tokens)
    cfg.data_files = []
    test = load_prepared(str(out), stage_settings(cfg, "evaluate", tokenizer))["test"]
    assert rows(test, ["input_ids", "label"]) == rows(own, ["input_ids", "label"]) and len(test) == 37


def _other_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "good", "bad"]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


@pytest.mark.parametrize("change,message", [
    ({"max_seq_length": 64}, "max_seq_length is 48 there, 64 here"),
    ({"truncation": "head"}, "truncation is 'head+tail' there, 'head' here; head_tokens is 12 there, None here"),
    ({"head_tokens": 20}, "head_tokens is 12 there, 20 here"),
    ({"validation_split": 0.2}, "validation_split is 0.1 there, 0.2 here"),
    ({"seed": 1}, "seed is 7 there, 1 here"),
    ({"max_samples": 50}, "max_samples is 0 there, 50 here"),
    ({"tokenizer": "other"}, "tokenizer_vocab_hash is "),
    ({"stage": "mlm"}, "stage is 'finetune' there, 'mlm' here"),
], ids=["max_seq_length", "truncation", "head_tokens", "validation_split", "seed", "max_samples", "tokenizer", "stage"])
def test_manifest_mismatch_is_refused_in_one_line(change, message, tmp_path, tiny_model, tokenizer, demo_files):
    out = tmp_path / "prep"
    run_prepare("--stage", "finetune", "--output_dir", out, "--model_name_or_path", tiny_model, "--data_files",
                demo_files["train"], "--max_seq_length", 48, "--head_tokens", 12, "--validation_split", 0.1,
                "--seed", 7)
    fields = dict(max_seq_length=48, head_tokens=12, validation_split=0.1, seed=7)
    fields.update({k: v for k, v in change.items() if k not in ("tokenizer", "stage")})
    tok = _other_tokenizer(tmp_path) if "tokenizer" in change else tokenizer
    cls, stage = (MLMConfig, "mlm") if "stage" in change else (FinetuneConfig, "finetune")
    if cls is MLMConfig:
        fields = {k: v for k, v in fields.items() if k != "head_tokens"}
    cfg = cls(output_dir="run", prepared_dir=str(out), **fields)
    with pytest.raises(DaptError) as err:
        (build_mlm_task if stage == "mlm" else build_classification_task)(cfg, INFO, tok)
    line = str(err.value)
    assert line.startswith(f"prepared data {out} does not match this run: ") and message in line and "\n" not in line


def test_damaged_or_foreign_directories_are_refused(tmp_path, tiny_model, tokenizer, demo_files):
    out = tmp_path / "prep"
    run_prepare("--stage", "evaluate", "--output_dir", out, "--model_name_or_path", tiny_model,
                "--data_files", demo_files["test"], "--max_seq_length", 40, "--truncation", "head")
    cfg = EvalConfig(output_dir="ev", model_name_or_path=str(tiny_model), max_seq_length=40, truncation="head")
    resolve_eval_settings(cfg, str(tiny_model))
    settings = stage_settings(cfg, "evaluate", tokenizer)
    arrow = next((out / "test").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-100] ^= 1
    arrow.write_bytes(bytes(data))
    with pytest.raises(DaptError, match="content fingerprint does not match its manifest"):
        load_prepared(str(out), settings)
    with pytest.raises(DaptError, match="is not a prepared data directory"):
        load_prepared(str(tmp_path), settings)
    with pytest.raises(DaptError, match="prepared_dir not found"):
        load_prepared(str(tmp_path / "nope"), settings)


def _error_line(proc):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dapt: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_prepare_cli_writes_nothing_partial(tmp_path, tiny_model, base_env, demo_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(50))
                   + json.dumps({"text": "odd", "label": 5}) + "\n")
    out = tmp_path / "sets" / "prep"
    common = ["--stage", "finetune", "--model_name_or_path", tiny_model, "--max_seq_length", 48, "--head_tokens", 12]
    line = _error_line(run_cli("prepare.py", common + ["--data_files", bad, "--output_dir", out], base_env, launcher="fork"))
    assert "label(s) outside {0, 1} in column 'label' (first at row 50: 5;" in line
    assert not (tmp_path / "sets").exists() or not any((tmp_path / "sets").iterdir())

    good = common + ["--data_files", demo_files["train"], "--output_dir", out]
    proc = run_cli("prepare.py", good, base_env, launcher="fork")
    assert_ok(proc)
    assert "examples" in proc.stdout and "truncated" in proc.stdout and "prepared finetune data" in proc.stdout
    first = json.loads((out / MANIFEST).read_text())
    line = _error_line(run_cli("prepare.py", good, base_env, launcher="fork"))
    assert "already holds prepared data; pass --overwrite_output_dir" in line
    assert json.loads((out / MANIFEST).read_text()) == first
    proc = run_cli("prepare.py", good + ["--overwrite_output_dir", "--max_samples", 100], base_env, launcher="fork")
    assert_ok(proc)
    assert json.loads((out / MANIFEST).read_text())["splits"]["train"]["examples"] == 98
    assert sorted(p.name for p in out.parent.iterdir()) == ["prep"]  # no temp or old siblings left

    other = tmp_path / "not_prepared"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    line = _error_line(run_cli("prepare.py", common + ["--data_files", demo_files["train"], "--output_dir", other,
                                                       "--overwrite_output_dir"], base_env, launcher="fork"))
    assert "is not a prepared data directory" in line and (other / "keep.txt").read_text() == "mine"


def test_training_reads_only_the_prepared_dir_offline(tmp_path, tiny_model, base_env, demo_files):
    """Prepare, delete the source file, then fine-tune and evaluate with HF_*_OFFLINE=1."""
    src = tmp_path / "train.jsonl"
    shutil.copy(demo_files["train"], src)
    prep = tmp_path / "prep_ft"
    run_prepare("--stage", "finetune", "--output_dir", prep, "--model_name_or_path", tiny_model,
                "--data_files", src, "--max_seq_length", 64, "--head_tokens", 16)
    src.unlink()
    env = dict(base_env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    train = ["--model_name_or_path", tiny_model, "--prepared_dir", prep, "--ds_config", "ds_configs/zero2_auto.json",
             "--effective_batch_size", 16, "--micro_batch_size", 8, "--num_epochs", 1, "--head_tokens", 16]
    line = _error_line(run_cli("finetune.py", train + ["--output_dir", tmp_path / "x", "--max_seq_length", 32], env, launcher="fork"))
    assert "does not match this run: max_seq_length is 64 there, 32 here" in line
    assert not (tmp_path / "x").exists()

    run = tmp_path / "run"
    proc = run_cli("finetune.py", train + ["--output_dir", run, "--max_seq_length", 64], env, launcher="fork")
    assert_ok(proc)
    assert (run / "model" / "model.safetensors").is_file()
    assert json.loads((run / "run_config.json").read_text())["config"]["prepared_dir"] == str(prep)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)

    prep_test = tmp_path / "prep_test"
    run_prepare("--stage", "evaluate", "--output_dir", prep_test, "--model_name_or_path", run,
                "--data_files", demo_files["test"])  # length and truncation: as the model was trained
    proc = run_cli("evaluate.py", ["--model_name_or_path", run, "--prepared_dir", prep_test, "--output_dir", run], env, launcher="fork")
    assert_ok(proc)
    results = json.loads((run / "eval_results.json").read_text())
    assert results["n_examples"] == 37 and results["max_seq_length"] == 64 and results["data"] == str(prep_test)


def test_aclimdb_tree_prepare_reports_leakage(tmp_path, tiny_model, capsys):
    tree = make_aclimdb(tmp_path / "aclImdb", duplicate="Boring.")  # a train review copied into test
    manifest = run_prepare("--stage", "finetune", "--output_dir", tmp_path / "p1", "--model_name_or_path", tiny_model,
                           "--data_files", tree, "--max_seq_length", 16, "--head_tokens", 4, "--validation_split", 0)
    assert manifest["leakage"]["shared_texts"] == 1 and manifest["splits"]["train"]["examples"] == 4
    assert "1 of 4 training texts also occur in the test data" in capsys.readouterr().out
    archive = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="aclImdb")
    shutil.rmtree(tree)
    manifest = run_prepare("--stage", "mlm", "--output_dir", tmp_path / "p2", "--model_name_or_path", tiny_model,
                           "--data_files", archive, "--dataset_split", "train+unsupervised", "--max_seq_length", 8,
                           "--validation_split", 0)
    assert manifest["leakage"]["shared_texts"] == 1 and manifest["splits"]["train"]["texts"] == 6


def test_real_imdb_prepare(tmp_path, tokenizer_dir):
    if not (SHARED_IMDB / "train.parquet").exists():
        pytest.skip("../shared/data/imdb not present")
    # The real MiniLM (512 positions): the statistics below are about 512-token inputs.
    manifest = run_prepare("--stage", "finetune", "--output_dir", tmp_path / "p", "--model_name_or_path", tokenizer_dir,
                           "--data_files", SHARED_IMDB / "train.parquet", "--test_files", SHARED_IMDB / "test.parquet",
                           "--max_samples", 2000, "--num_proc", 2)
    train = manifest["splits"]["train"]
    assert train["examples"] == 1960 and 0.10 < train["truncated_share"] < 0.20  # 14.8% of all reviews > 512
    assert 180 < train["tokens_p50"] < 290 and train["tokens_max"] > 1000
    assert manifest["leakage"]["test_texts"] == 25000 and manifest["leakage"]["train_texts"] == 2000
    assert os.path.isdir(tmp_path / "p" / "validation")
