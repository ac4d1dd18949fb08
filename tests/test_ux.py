"""What users see (issue 6): W&B offline runs and the local metrics log, progress output, `dapt report`,
`dapt predict`, the model card and the Gradio demo. Real 2-rank DeepSpeed runs of a tiny BERT on CPU."""
from __future__ import annotations

import glob
import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, assert_ok, run_cli
from ranks import ForkedJob
from ranks import run as run_forked

pytestmark = pytest.mark.ux

GROUP = "ux-test-group"
TRAIN_KEYS = {"step", "epoch", "loss", "lr", "tokens_per_s", "samples_per_s", "step_time_s", "skipped_steps",
              "grad_norm"}
LONG_REVIEW = ("The opening is " + "slow and meandering, " * 60 + "but the ending is wonderful, moving and superb. "
               "I loved it.")


# --- reading W&B's offline run files --------------------------------------------------------------

def wandb_records(path: Path):
    """The records of a `.wandb` file (W&B's LevelDB-style log: 7-byte header, 32 KiB blocks, chunks of
    crc32 / length / type), decoded with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> dict:
    (wandb_file,) = run_dir.glob("run-*.wandb")
    out = {"history": [], "summary": {}, "config": {}, "run": None}
    for r in wandb_records(wandb_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"id": r.run.run_id, "group": r.run.run_group, "job_type": r.run.job_type}
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- one fine-tune run, interrupted and resumed, then evaluated: all with W&B offline --------------

@pytest.fixture(scope="module")
def wandb_env(base_env, tmp_path_factory):
    pytest.importorskip("wandb")
    wdir = tmp_path_factory.mktemp("wandb_dir")
    return {**base_env, "WANDB_MODE": "offline", "WANDB_DIR": str(wdir), "DAPT_WANDB_GROUP": GROUP,
            "WANDB_SILENT": "true", "WANDB_API_KEY": ""}, wdir


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, demo_files, wandb_env):
    env, wdir = wandb_env
    out = tmp_path_factory.mktemp("ux_ft") / "run"
    args = ["--model_name_or_path", tiny_model, "--data_files", demo_files["train"], "--output_dir", out,
            "--ds_config", "ds_configs/zero2_auto.json", "--max_seq_length", "64", "--head_tokens", "16",
            "--num_epochs", "2", "--learning_rate", "2e-3", "--warmup", "0.1", "--validation_split", "0.1",
            "--effective_batch_size", "16", "--micro_batch_size", "4", "--logging_steps", "2", "--seed", "1",
            "--save_steps", "2"]
    # SIGUSR1 on rank 0 at step 5: the job saves and exits 75; the same command then resumes it.
    first = run_cli("finetune.py", args, {**env, "DAPT_FAULT": "signal=train:0:5"}, ranks=2, launcher="fork")
    assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
    first_id = (out / "wandb_run_id").read_text().strip()
    second = run_cli("finetune.py", args, env, ranks=2, launcher="fork")
    assert_ok(second)
    eval_dir = out.parent / "eval"
    evaluated = run_cli("evaluate.py", ["--model_name_or_path", out, "--data_files", demo_files["test"],
                                        "--output_dir", eval_dir, "--eval_batch_size", "8"], env, ranks=2,
                        launcher="fork")
    assert_ok(evaluated)
    return {"out": out, "eval_dir": eval_dir, "wandb_dir": wdir, "first_id": first_id, "first": first,
            "second": second, "evaluated": evaluated, "test_file": demo_files["test"]}


def test_metrics_jsonl_has_every_training_number(run):
    records = _jsonl(run["out"] / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    assert all(TRAIN_KEYS <= set(r) for r in train), train[0]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)) and steps[-1] == json.loads((run["out"] / "summary.json").read_text())["steps"]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["step_time_s"] > 0
               for r in train)
    assert len(evals) == 2 and all({"eval_accuracy", "eval_f1_macro", "eval_n_examples"} <= set(r) for r in evals)


def test_wandb_offline_run_holds_config_metrics_and_resumes_the_same_id(run):
    out, wdir = run["out"], run["wandb_dir"]
    run_id = (out / "wandb_run_id").read_text().strip()
    assert run_id == run["first_id"]  # the resumed job continued the same W&B run
    dirs = sorted(Path(p) for p in glob.glob(str(wdir / "wandb" / f"offline-run-*-{run_id}")))
    assert len(dirs) == 2  # the interrupted job and its resumption, one run id
    first, resumed = read_offline_run(dirs[0]), read_offline_run(dirs[1])
    for part in (first, resumed):
        assert part["run"] == {"id": run_id, "group": GROUP, "job_type": "finetune"}
    # the full resolved config: training config and the filled-in DeepSpeed JSON (= run_config.json)
    run_config = json.loads((out / "run_config.json").read_text())
    assert resumed["config"]["config"] == run_config["config"]
    assert resumed["config"]["deepspeed"]["train_batch_size"] == 16
    assert resumed["config"]["deepspeed"]["gradient_accumulation_steps"] == 2
    # the same numbers as metrics.jsonl: the stop checkpoint is the stop step, so the two parts together
    # are the local log exactly (nothing dropped on resume, nothing repeated)
    local = _jsonl(out / "metrics.jsonl")
    logged = [{k: v for k, v in h.items() if not k.startswith("_")} for h in first["history"] + resumed["history"]]
    assert first["history"] and resumed["history"] and logged == local
    # final metrics in the summary
    summary = json.loads((out / "summary.json").read_text())
    final = resumed["summary"]
    assert final["steps"] == summary["steps"]
    assert final["final_eval_accuracy"] == pytest.approx(summary["final_eval"]["eval_accuracy"])
    assert final["loss"] == [r for r in local if "loss" in r][-1]["loss"]
    assert final["eval_f1_macro"] == pytest.approx(summary["final_eval"]["eval_f1_macro"])


def test_wandb_evaluation_run_joins_the_group(run):
    results = json.loads((run["eval_dir"] / "eval_results.json").read_text())
    dirs = [Path(p) for p in glob.glob(str(run["wandb_dir"] / "wandb" / "offline-run-*"))]
    evals = [r for r in map(read_offline_run, dirs) if r["run"]["job_type"] == "evaluate"]
    assert len(evals) == 1 and evals[0]["run"]["group"] == GROUP
    assert evals[0]["summary"]["test_accuracy"] == pytest.approx(results["accuracy"])
    assert evals[0]["summary"]["test_f1_macro"] == pytest.approx(results["f1_macro"])
    assert evals[0]["summary"]["test_n_examples"] == 37


def test_plain_progress_lines_without_carriage_returns(run):
    stdout = run["second"].stdout
    assert "\r" not in stdout
    lines = [ln for ln in stdout.splitlines() if ln.startswith("step ")]
    assert lines and all("grad_norm" in ln for ln in lines)
    assert all(" eta " in ln for ln in lines[:-1])
    assert f"W&B offline run {run['first_id']}" in stdout and "wandb sync" in stdout


def test_model_card_quotes_the_measured_eval_results(run):
    model = run["out"] / "model"
    card = (model / "README.md").read_text()
    results = json.loads((run["eval_dir"] / "eval_results.json").read_text())
    assert results["set"] == f"{run['test_file'].parent.name}-test"  # named after its data
    lo, hi = results["accuracy_ci"]
    assert lo <= results["accuracy"] <= hi and 0 < hi - lo < 0.5
    lo, hi = results["f1_macro_ci"]
    assert lo <= results["f1_macro"] <= hi
    stored = json.loads((model / "results" / f"{results['set']}.json").read_text())
    assert stored == results  # the numbers the card quotes
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "text-classification"
    (entry,) = front["model-index"][0]["results"]
    assert entry["dataset"]["name"] == results["set"]
    metrics = {m["type"]: (m["value"], m["args"]["ci95"]) for m in entry["metrics"]}
    assert metrics == {"accuracy": (results["accuracy"], results["accuracy_ci"]),
                       "f1": (results["f1_macro"], results["f1_macro_ci"])}
    acc, f1 = results["accuracy_ci"], results["f1_macro_ci"]
    assert (f"| {results['set']} | 37 | {results['accuracy']:.4f} [{acc[0]:.4f}, {acc[1]:.4f}] | "
            f"{results['f1_macro']:.4f} [{f1[0]:.4f}, {f1[1]:.4f}] |") in card
    for text in ("## Training procedure", "## Intended use", "## Limitations", "ZeRO stage 2", "head+tail",
                 "train.jsonl", "2 x cpu", "domain shift", "truncated", "| effective batch | 16"):
        assert text in card, text
    steps = json.loads((run["out"] / "summary.json").read_text())["steps"]
    assert f"| epochs / optimizer steps | 2 / {steps} |" in card
    held_out = [r for r in _jsonl(run["out"] / "metrics.jsonl") if "eval_accuracy" in r][-1]
    assert f"accuracy {held_out['eval_accuracy']:.6g}" in card
    assert "95% intervals: accuracy" in run["evaluated"].stdout  # the printed table shows them too


def test_several_sets_predictions_and_concurrent_evaluations_keep_every_result(run, demo_files, tmp_path,
                                                                                base_env):
    """--eval_sets: one results file per set, a combined table, per-set predictions in input order (ids
    kept); the card keeps one entry per set, and two evaluation jobs on one model at once lose none."""
    model = tmp_path / "model"
    shutil.copytree(run["out"] / "model", model)
    rows = [json.loads(line) for line in demo_files["test"].read_text().splitlines()][::-1][:23]  # odd N
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "id": f"r{i:03d}"}) + "\n" for i, r in enumerate(rows)))
    out = tmp_path / "eval"
    proc = run_cli("evaluate.py", ["--model_name_or_path", model, "--eval_sets", f"demo={demo_files['test']}",
                                   f"other={other}", "--save_predictions", "--output_dir", out,
                                   "--eval_batch_size", "4"], base_env, ranks=2, launcher="fork")
    assert_ok(proc)
    demo, oth = (json.loads((out / f"eval_results-{n}.json").read_text()) for n in ("demo", "other"))
    assert (demo["set"], demo["n_examples"], oth["set"], oth["n_examples"]) == ("demo", 37, "other", 23)
    table = (out / "eval_table.md").read_text()
    assert "| demo | 37 |" in table and "| other | 23 |" in table
    preds = _jsonl(out / "predictions-other.jsonl")
    assert [p["id"] for p in preds] == [f"r{i:03d}" for i in range(23)] and [p["row"] for p in preds] == list(range(23))
    assert [p["label"] for p in preds] == [["negative", "positive"][r["label"]] for r in rows]
    correct = sum(p["label"] == p["predicted"] for p in preds)
    assert correct == oth["confusion_matrix"][0][0] + oth["confusion_matrix"][1][1]
    # two jobs at once on the same model, each with its own set: the card ends with all four entries
    jobs = [ForkedJob(["-m", "dapt", "evaluate", "--model_name_or_path", str(model), "--data_files", str(other),
                       "--eval_name", name, "--output_dir", str(tmp_path / name)], base_env, 1)
            for name in ("job-a", "job-b")]
    for job in jobs:
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-3000:]
    sets = {"demo", "other", "job-a", "job-b", json.loads((run["eval_dir"] / "eval_results.json").read_text())["set"]}
    assert {p.stem for p in (model / "results").glob("*.json")} == sets
    front = yaml.safe_load((model / "README.md").read_text().split("---\n")[1])
    assert {r["dataset"]["name"] for r in front["model-index"][0]["results"]} == sets
    # evaluating a set again replaces only that set's entry
    again = run_cli("evaluate.py", ["--model_name_or_path", model, "--data_files", other, "--eval_name", "job-a",
                                    "--output_dir", tmp_path / "again"], base_env, launcher="fork")
    assert_ok(again)
    assert {p.stem for p in (model / "results").glob("*.json")} == sets


def test_export_command_writes_a_card_before_evaluation(run, tmp_path, base_env):
    # launch/export.py on the same run: card without eval numbers yet (says how to get them)
    assert_ok(run_cli("export.py", ["--checkpoint", run["out"], "--output_dir", tmp_path / "m"], base_env, launcher="fork"))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Not evaluated on a test set yet" in card and "model-index" not in card


def test_mlm_card_and_lineage(tmp_path):
    from dapt.model.card import CARD_DATA, record_results, render

    data = {"arch": "mlm", "settings": {"stage": "mlm", "max_seq_length": 128, "mlm_probability": 0.15},
            "base_model": "bert-base-uncased", "steps": 300, "checkpoint": "step0000300",
            "data": {"kind": "hub", "name": "stanfordnlp/imdb", "split": "unsupervised"},
            "recipe": {"learning_rate": 2e-5, "num_epochs": 3, "mlm_probability": 0.15, "seed": 42},
            "engine": {"zero_stage": 3, "precision": "bf16", "world_size": 8, "device": "cuda:0"},
            "model": {"type": "bert", "layers": 12, "hidden_size": 768, "parameters": 110_000_000},
            "validation": {"step": 300, "eval_loss": 1.9, "eval_perplexity": 6.7}}
    card = render(data, [], "imdb-mlm")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "fill-mask" and front["base_model"] == "bert-base-uncased"
    assert front["datasets"] == ["stanfordnlp/imdb"] and "model-index" not in front
    assert "perplexity 6.7" in card and "ZeRO stage 3, bf16, 8 x cuda:0" in card and "p = 0.15" in card
    assert "## Limitations" in card and "Two labels only" not in card
    # the evaluation job leaves folders that dapt did not export alone
    assert record_results(tmp_path, {"set": "x", "accuracy": 1.0}) is None and not (tmp_path / "README.md").exists()
    assert not (tmp_path / CARD_DATA).exists()


# --- report ---------------------------------------------------------------------------------------

def test_report_plots_and_summary(run, tmp_path, base_env):
    # a pipeline-shaped directory (dapt/layout.py): finetune/ (a stage) and eval/eval_results.json
    from dapt.layout import RunLayout

    pipe = tmp_path / "pipe"
    layout = RunLayout(pipe)
    layout.eval.root.mkdir(parents=True)
    layout.finetune.root.symlink_to(run["out"], target_is_directory=True)
    layout.eval.results.write_bytes((run["eval_dir"] / "eval_results.json").read_bytes())
    proc = run_forked(["-m", "dapt", "report", str(pipe)], base_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # it says what it wrote, one path a line (not a Python dict)
    assert proc.stdout.splitlines()[0] == f"report written to {pipe / 'report'}:"
    assert f"  {pipe / 'report' / 'report.md'}" in proc.stdout.splitlines() and "{" not in proc.stdout
    report = pipe / "report"
    from PIL import Image

    for name in ("finetune_training.png", "confusion_matrix.png"):
        img = Image.open(report / name)
        assert img.format == "PNG" and img.size[0] >= 400
        assert len(img.convert("L").getcolors(1 << 16)) > 50  # drawn content, not a blank canvas
    md = (report / "report.md").read_text()
    results = json.loads(layout.eval.results.read_text())
    assert f"| accuracy | {results['accuracy']:.4f} [" in md and "![finetune](finetune_training.png)" in md
    bad = subprocess.run([sys.executable, "-m", "dapt", "report", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("dapt: error: run directory not found")


# --- predict --------------------------------------------------------------------------------------

def _reference(model_dir: Path, texts: list[str]) -> list[tuple[str, float]]:
    """One text at a time through training's own tokenisation (tokenize_for_classification)."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dapt.data.classify import tokenize_for_classification

    cfg = json.loads((model_dir / "config.json").read_text())["dapt"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    data = tokenize_for_classification(datasets.Dataset.from_dict({"text": texts}), tok, cfg["max_seq_length"],
                                       cfg["truncation"], cfg["head_tokens"])
    out = []
    with torch.no_grad():
        for ids in data["input_ids"]:
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits, -1)[0]
            out.append((model.config.id2label[int(p.argmax())], float(p.max())))
    return out


def _predict(args, env, stdin=None):
    return run_forked(["-m", "dapt", "predict", *map(str, args)], env, stdin=stdin, timeout=120)


def test_predict_matches_training_truncation_from_args_file_and_stdin(run, base_env, tmp_path):
    model = run["out"] / "model"
    texts = ["I loved every minute of it.", LONG_REVIEW, "Terrible, boring, a waste of two hours.", "ok"]
    expected = _reference(model, texts)
    proc = _predict(["--model", model, *texts, "--batch_size", "3"], base_env)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [g["text"] for g in got] == texts
    for g, (label, score) in zip(got, expected):
        assert g["label"] == label and g["score"] == pytest.approx(score, abs=1e-5)
    # the same from a file (blank lines skipped) and from stdin, as a table
    (tmp_path / "in.txt").write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")
    from_file = _predict(["--model", run["out"], "--file", tmp_path / "in.txt", "--batch_size", "1",
                          "--output", tmp_path / "p.jsonl"], base_env)
    assert from_file.returncode == 0, from_file.stderr
    assert [json.loads(x)["label"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == [e[0] for e in expected]
    table = _predict(["--model", model, "--format", "table"], base_env, stdin="\n".join(texts) + "\n")
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["label", "score", "text"] and len(rows) == 5
    assert rows[2].split()[0] == expected[1][0] and rows[2].endswith("...")


def test_predict_truncation_really_is_head_plus_tail(run):
    from dapt.model.settings import InputSettings
    from dapt.serve.predict import Predictor

    p = Predictor(run["out"] / "model", device="cpu")
    assert p.settings == InputSettings(max_seq_length=64, truncation="head+tail", head_tokens=16)
    (ids,) = p.encode([LONG_REVIEW])
    full = p.tokenizer(LONG_REVIEW, add_special_tokens=False)["input_ids"]
    assert len(ids) == 64 and ids[1:17] == full[:16] and ids[17:-1] == full[-46:]


def test_predict_and_evaluate_resolve_the_same_settings(run, tiny_model, tmp_path):
    """One reader of "how was this model trained": the evaluation job and predict cut a review the same
    way, for a dapt model and for a foreign one (no `dapt` entry: the package defaults for both)."""
    from dapt.config import EvalConfig
    from dapt.model.settings import InputSettings, resolve_eval_settings
    from dapt.serve.predict import Predictor

    foreign = tmp_path / "foreign"
    shutil.copytree(run["out"] / "model", foreign)
    config = json.loads((foreign / "config.json").read_text())
    del config["dapt"]
    (foreign / "config.json").write_text(json.dumps(config))
    for model, expected in ((run["out"] / "model", InputSettings(64, "head+tail", 16)),
                            (foreign, InputSettings(128, "head+tail", 31))):  # 128 positions: (128 - 2) // 4 head
        cfg = EvalConfig(output_dir="x", model_name_or_path=str(model))
        resolve_eval_settings(cfg, str(model))
        assert InputSettings(cfg.max_seq_length, cfg.truncation, cfg.head_tokens) == expected
        assert Predictor(model, device="cpu").settings == expected


def test_predict_bad_input_is_one_line(run, base_env, tmp_path):
    missing = _predict(["--model", tmp_path / "no_model", "hello"], base_env)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"dapt: error: model folder not found: {tmp_path / 'no_model'}"]
    empty = _predict(["--model", run["out"] / "model"], base_env, stdin="\n  \n")
    assert empty.returncode == 2 and empty.stderr.strip() == "dapt: error: no input text (empty input, or only blank lines)"
    nofile = _predict(["--model", run["out"] / "model", "--file", tmp_path / "x.txt"], base_env)
    assert nofile.returncode == 2 and "input file not found" in nofile.stderr


# --- progress and W&B mode (units) -----------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_terminal_and_lines_elsewhere():
    from dapt.observe.progress import Progress

    tty = _Tty()
    bar = Progress(total_steps=10, initial_step=4, stream=tty)
    for step in range(5, 11):
        bar.advance(step)
        bar.write({"step": step, "loss": 0.5, "lr": 1e-4}, f"step {step}/10 loss 0.5")
    bar.write({"step": 10, "eval_accuracy": 0.9}, "eval @ step 10: accuracy 0.9")
    bar.close()
    text = tty.getvalue()
    assert "\r" in text and "10/10" in text and "train" in text and "eval @ step 10" in text
    assert "step 5/10" not in text  # train records go to the bar's postfix, not as lines

    plain = io.StringIO()
    lines = Progress(total_steps=10, initial_step=0, stream=plain)
    lines.advance(5)
    lines.write({"step": 5, "loss": 0.5, "lr": 1e-4, "grad_norm": 1.5}, "step 5/10 loss 0.5")
    assert "\r" not in plain.getvalue() and plain.getvalue().startswith("step 5/10 loss 0.5 grad_norm 1.5 eta ")


def test_wandb_mode_resolution():
    from dapt.observe.tracking import resolve_wandb_mode, wandb_group

    pytest.importorskip("wandb")
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "x"}) == "disabled"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "x" * 40, "NETRC": "/nonexistent"}) == "online"
    assert resolve_wandb_mode("auto", {"NETRC": "/nonexistent"}) == "disabled"
    assert resolve_wandb_mode("offline", {"WANDB_MODE": "online"}) == "offline"  # the config wins
    assert wandb_group("", {"DAPT_WANDB_GROUP": "g"}) == "g" and wandb_group("mine", {"DAPT_WANDB_GROUP": "g"}) == "mine"


def test_bad_wandb_settings_are_one_line_errors(base_env, tmp_path):
    proc = run_cli("finetune.py", ["--output_dir", tmp_path / "x", "--wandb_mode", "sometimes"], base_env, launcher="fork")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "dapt: error: wandb_mode must be one of auto, online, offline, disabled, got 'sometimes'")
    assert not (tmp_path / "x").exists()


def test_wandb_failure_never_stops_training(tmp_path, capsys):
    from dapt.observe.tracking import WandbRun

    class Broken:
        id = "x"

        def log(self, *_a, **_k):
            raise ConnectionError("no route to api.wandb.ai")

    run = WandbRun(Broken())
    run.log({"step": 1, "loss": 1.0})
    run.log({"step": 2, "loss": 1.0})
    run.finish()
    err = capsys.readouterr().err
    assert err.count("warning: W&B log failed") == 1 and run.run is None


# --- cli and gradio --------------------------------------------------------------------------------

def test_cli_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "dapt", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("report", "predict", "mlm", "finetune", "demo"))
    bad = subprocess.run([sys.executable, "-m", "dapt", "fly"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'fly'" in bad.stderr


def test_gradio_demo_headless(run, monkeypatch):
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from conftest import free_port

    from dapt.serve.app import build_demo

    model = run["out"] / "model"
    expected = _reference(model, ["I loved every minute of it.", LONG_REVIEW])
    demo = build_demo(str(model), device="cpu")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        for text, (label, score) in zip(["I loved every minute of it.", LONG_REVIEW], expected):
            got = client.predict(text, api_name="/predict")
            assert got["label"] == label
            conf = {c["label"]: c["confidence"] for c in got["confidences"]}
            assert set(conf) == {"negative", "positive"} and conf[label] == pytest.approx(score, abs=1e-5)
    finally:
        demo.close()
