"""More than two labels: classes from the data or the recipe, K-class metrics and intervals checked against
scikit-learn, exact 2-rank evaluation at K = 4, names in the exported config, predictions, card and demo,
and one clear line for each kind of bad label setting.

The multi-class set is made here: four topics (World, Sports, Business, Sci/Tech, as AG News) written from
templates, with string labels for training and both names and ids in the test files."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_ok, run_cli
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from dapt.config import EvalConfig, FinetuneConfig
from dapt.data.labels import id_set_text, summary_line
from dapt.data.sources import load_source
from dapt.errors import DaptError
from dapt.eval.metrics import add_intervals, confusion_counts, format_table, metrics_from_confusion
from dapt.eval.stats import bootstrap_macro_f1_interval, macro_f1_from_confusion, wilson_interval

TOPICS = {
    "World": ["the prime minister met foreign leaders", "elections were held across the region",
              "the united nations called for a ceasefire", "protesters gathered outside the embassy"],
    "Sports": ["the striker scored twice in the final", "the coach praised the young goalkeeper",
               "the team won the championship title", "the marathon record fell on sunday"],
    "Business": ["shares rose after the quarterly earnings", "the bank raised interest rates",
                 "the company announced a merger deal", "oil prices fell on weak demand"],
    "Sci/Tech": ["researchers released a new open source compiler", "the probe sent images from mars",
                 "the chip maker unveiled a faster processor", "scientists sequenced the plant genome"],
}
NAMES = sorted(TOPICS, key=str.lower)  # inferred classes: the distinct names, sorted
FILLER = ["reports said on monday", "according to officials", "in a statement", "analysts noted"]


def _text(rng: random.Random, topic: str) -> str:
    parts = [rng.choice(TOPICS[topic]) for _ in range(rng.randint(1, 3))] + [rng.choice(FILLER)]
    rng.shuffle(parts)
    return " , ".join(parts).capitalize() + "."


def _rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    topics = list(TOPICS)
    return [(_text(rng, topics[i % 4]), topics[i % 4]) for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def topic_files(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl (names), test.csv (names, mixed case) and test-ids.parquet (the same rows as ids)."""
    import pandas as pd

    d = tmp_path_factory.mktemp("topics")
    train = _jsonl(d / "train.jsonl", [{"text": t, "label": y} for t, y in _rows(160, 1)])
    test_rows = _rows(41, 2)  # a prime: uneven shards over 2 ranks
    with (d / "test.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([t, y.upper() if i % 3 == 0 else y] for i, (t, y) in enumerate(test_rows))
    pd.DataFrame({"text": [t for t, _ in test_rows], "label": [NAMES.index(y) for _, y in test_rows]}).to_parquet(
        d / "test-ids.parquet")
    return {"train": train, "test": d / "test.csv", "test_ids": d / "test-ids.parquet", "test_rows": test_rows}


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _load(tmp_path, labels, cls=FinetuneConfig, **kw):
    path = _jsonl(tmp_path / f"d{abs(hash(json.dumps([labels, kw], default=str)))}.jsonl",
                  [{"text": f"text {i}", "label": y} for i, y in enumerate(labels)])
    extra = {"model_name_or_path": "m"} if cls is EvalConfig else {}
    ds, report = load_source(cls(output_dir="x", data_files=[str(path)], **extra, **kw), 0, "label")
    return ds["label"], report.label_names, report.label_counts


# --- classes from the data or the config ------------------------------------------------------------------

def test_classes_are_inferred_from_ids_or_names_or_set_by_the_config(tmp_path, private_cache):
    # binary ids stay the default (negative/positive)
    assert _load(tmp_path, [0, 1, 1, 0]) == ([0, 1, 1, 0], ["negative", "positive"], [2, 2])
    # ids 0..3 that all occur: four classes named by their ids
    assert _load(tmp_path, [0, 1, 2, 3, 3]) == ([0, 1, 2, 3, 3], ["0", "1", "2", "3"], [1, 1, 1, 2])
    # names only: the distinct names, sorted, are the classes
    assert _load(tmp_path, ["World", "Sports", "Business", "Sci/Tech", " sports "]) == (
        [3, 2, 0, 1, 2], ["Business", "Sci/Tech", "Sports", "World"], [1, 1, 2, 1])
    # label_names fix the order (and the names match without regard to case); ids may be mixed in as digits
    got = _load(tmp_path, ["neg", "Neutral", "positive", "2"], label_names=["negative", "neutral", "positive"])
    assert got == ([0, 1, 2, 2], ["negative", "neutral", "positive"], [1, 1, 2])
    # label_map adds a third class to the built-in names
    assert _load(tmp_path, ["neg", "pos", "neutral"], label_map=["neutral=2"]) == (
        [0, 1, 2], ["negative", "positive", "neutral"], [1, 1, 1])
    # num_labels: a class may have no training example
    assert _load(tmp_path, [0, 1, 4], num_labels=5)[1:] == (["0", "1", "2", "3", "4"], [1, 1, 0, 0, 1])


@pytest.mark.parametrize("labels, kw, message", [
    ([0, 1, 3], {}, r"1 label\(s\) outside \{0, 1\} in column 'label' \(first at row 2: 3;.*--num_labels"),
    ([0, 1, 2, 4], {"num_labels": 4}, r"1 label\(s\) outside \{0, 1, 2, 3\}.*row 3: 4"),
    (["a", "b", "c"], {"num_labels": 4}, r"num_labels is 4 but the label column holds 3 distinct name\(s\): a, b, c"),
    (["x", "y", "zed"], {"label_names": ["x", "y"]}, r"1 label\(s\) outside \{0, 1\}.*row 2: 'zed'"),
    (["neg", "pos", "meh"], {}, r"1 label\(s\) outside \{0, 1\}.*row 2: 'meh'; names accepted: neg, negative"),
])
def test_labels_that_make_no_valid_classes_are_one_error(tmp_path, private_cache, labels, kw, message):
    with pytest.raises(DaptError, match=message):
        _load(tmp_path, labels, **kw)


def test_evaluation_labels_must_be_the_models_classes(tmp_path, private_cache):
    """Evaluation never infers: names or ids of the model's classes only (resolved from the model first)."""
    fixed = {"label_names": NAMES, "num_labels": 4}
    assert _load(tmp_path, ["world", "1", "SPORTS"], EvalConfig, **fixed)[0] == [3, 1, 2]
    with pytest.raises(DaptError, match=r"outside \{0, 1, 2, 3\}.*row 1: 'Weather'.*the model's classes are Business"):
        _load(tmp_path, ["World", "Weather"], EvalConfig, **fixed)
    with pytest.raises(DaptError, match=r"outside \{0, 1, 2, 3\}.*row 0: 7"):
        _load(tmp_path, [7, 1], EvalConfig, **fixed)


def test_summary_line_and_id_sets():
    assert summary_line(["a", "b", "c"], [3, 0, 2]) == "labels: 3 classes in the training data: a 3, b 0, c 2 (no examples of b)"
    assert id_set_text(2) == "{0, 1}" and id_set_text(13) == "{0, ..., 12}"


# --- metrics and intervals at K = 3..13 -------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 4, 6, 13])
def test_k_class_metrics_match_scikit_learn(k):
    rng = np.random.default_rng(k)
    n = 400
    y = rng.integers(0, k, n)
    y[y == k - 1] = 0  # the last class never occurs ...
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    p[p == k - 1] = 1  # ... and is never predicted: F1 0 (zero_division=0), still in the macro mean
    names = {i: f"c{i}" for i in range(k)}
    res = metrics_from_confusion(confusion_counts(torch.tensor(y), torch.tensor(p), k), names)
    labels = list(range(k))
    assert res["confusion_matrix"] == confusion_matrix(y, p, labels=labels).tolist()
    assert res["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert res["f1_macro"] == pytest.approx(f1_score(y, p, labels=labels, average="macro", zero_division=0))
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    for i in labels:
        got = res["per_class"][names[i]]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((prec[i], rec[i], f1[i]))
        assert got["support"] == sup[i]
    assert res["f1_macro"] == pytest.approx(macro_f1_from_confusion(res["confusion_matrix"]))
    add_intervals(res)
    low, high = res["f1_macro_ci"]
    assert low < res["f1_macro"] < high and high - low < 0.2
    assert res["accuracy_ci"] == pytest.approx(list(wilson_interval(int(np.trace(res["confusion_matrix"])), n)))
    # the same counts give the same interval (seeded), whoever computes it
    assert bootstrap_macro_f1_interval(res["confusion_matrix"]) == tuple(res["f1_macro_ci"])
    table = format_table(res)
    assert f"c{k - 1}" in table and "confusion matrix" in table


def test_bootstrap_interval_covers_the_truth_at_k_13():
    """A 13-class problem (ChemProt's size): the 95% bootstrap interval of macro-F1 from one test set of 600
    covers the population macro-F1 in most of 40 simulated test sets."""
    rng = np.random.default_rng(0)
    k = 13
    truth = rng.dirichlet(np.ones(k * k) * 0.3).reshape(k, k) + np.eye(k) * 0.5
    truth /= truth.sum()
    population = macro_f1_from_confusion(np.round(truth * 1e7).astype(np.int64))
    covered = 0
    for s in range(40):
        sample = np.random.default_rng(100 + s).multinomial(600, truth.ravel()).reshape(k, k)
        low, high = bootstrap_macro_f1_interval(sample, draws=2000, seed=s)
        covered += low <= population <= high
    assert covered >= 32  # nominal 95%: 38 of 40; the plug-in bootstrap is a little optimistic at small n


# --- config checks: one line, exit 2 ----------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--num_labels", "1"], "num_labels must be 0 (inferred) or at least 2, got 1"),
    (["--label_names", "a", "b", "c", "--num_labels", "4"], "label_names has 3 names but num_labels is 4"),
    (["--label_names", "World", "Sports", "world"], "label_names: duplicated class name 'world' (and 'World')"),
    (["--label_map", "neutral=3", "--num_labels", "3"], "label_map entries are name=id with id 0..2, got 'neutral=3'"),
])
def test_bad_label_settings_are_one_line(args, message, tmp_path, capsys):
    from dapt.commands import finetune

    with pytest.raises(SystemExit) as exit_:
        finetune.main(["--output_dir", str(tmp_path / "x"), *args])
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dapt: error:")]
    assert len(lines) == 1 and message in lines[0], lines


# --- the real entry points: fine-tune (classes inferred), 2-rank evaluation, export, card, predict -------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, topic_files, base_env):
    out = tmp_path_factory.mktemp("mc") / "ft"
    ft = run_cli("finetune.py", ["--model_name_or_path", tiny_model, "--data_files", topic_files["train"],
                                 "--output_dir", out, "--ds_config", "ds_configs/zero2_auto.json",
                                 "--max_seq_length", "48", "--head_tokens", "16", "--num_epochs", "3",
                                 "--learning_rate", "3e-3", "--effective_batch_size", "16", "--micro_batch_size", "8",
                                 "--validation_split", "0.1", "--seed", "3"], base_env, launcher="fork")
    assert_ok(ft)
    eval_dir = out.parent / "eval"
    ev = run_cli("evaluate.py", ["--model_name_or_path", out, "--eval_sets", f"names={topic_files['test']}",
                                 f"ids={topic_files['test_ids']}", "--output_dir", eval_dir, "--eval_batch_size", "4",
                                 "--save_predictions"], base_env, ranks=2, launcher="fork")
    assert_ok(ev)
    return {"out": out, "model": out / "model", "eval_dir": eval_dir, "finetune": ft, "evaluate": ev}


def test_finetune_prints_the_inferred_classes_once(trained):
    lines = [ln for ln in trained["finetune"].stdout.splitlines() if ln.startswith("labels:")]
    assert lines == ["labels: 4 classes in the training data: Business 40, Sci/Tech 40, Sports 40, World 40"]
    run_config = json.loads((trained["out"] / "run_config.json").read_text())
    assert run_config["config"]["num_labels"] == 4 and run_config["config"]["label_names"] == NAMES


def test_exported_config_and_pipeline_show_the_names(trained):
    from transformers import pipeline

    config = json.loads((trained["model"] / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(NAMES)}
    assert config["label2id"] == {n: i for i, n in enumerate(NAMES)}
    clf = pipeline("text-classification", model=str(trained["model"]), device="cpu")
    assert clf("the team won the championship title", truncation=True)[0]["label"] in NAMES


def test_two_rank_evaluation_is_exact_and_matches_scikit_learn(trained, topic_files):
    by_set = {}
    for name in ("names", "ids"):
        res = json.loads((trained["eval_dir"] / f"eval_results-{name}.json").read_text())
        preds = [json.loads(ln) for ln in (trained["eval_dir"] / f"predictions-{name}.jsonl").read_text().splitlines()]
        assert res["world_size"] == 2 and res["n_examples"] == len(preds) == len(topic_files["test_rows"]) == 41
        assert [p["row"] for p in preds] == list(range(41))  # every example once, in input order
        y = [p["label"] for p in preds]
        assert y == [t for _, t in topic_files["test_rows"]]  # names, whether the file held names or ids
        p = [p["predicted"] for p in preds]
        assert res["confusion_matrix"] == confusion_matrix(y, p, labels=NAMES).tolist()
        assert res["accuracy"] == pytest.approx(accuracy_score(y, p))
        assert res["f1_macro"] == pytest.approx(f1_score(y, p, labels=NAMES, average="macro", zero_division=0))
        prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=NAMES, zero_division=0)
        assert list(res["per_class"]) == NAMES
        for i, n in enumerate(NAMES):
            assert res["per_class"][n]["f1"] == pytest.approx(f1[i]) and res["per_class"][n]["support"] == sup[i]
        assert res["accuracy_ci"][0] <= res["accuracy"] <= res["accuracy_ci"][1]
        assert res["f1_macro_ci"][0] <= res["f1_macro"] <= res["f1_macro_ci"][1]
        by_set[name] = res
    assert by_set["names"]["confusion_matrix"] == by_set["ids"]["confusion_matrix"]


def test_card_lists_the_classes_and_per_class_results(trained):
    card = (trained["model"] / "README.md").read_text()
    assert "A BERT-family text classifier with 4 classes (`Business`, `Sci/Tech`, `Sports`, `World`)" in card
    assert "## Classes" in card and "| 3 | World |" in card
    assert "cross-entropy, 4 labels" in card and "sentiment" not in card.lower()
    assert "| class | precision | recall | F1 | support |" in card and "| Sci/Tech | " in card
    assert "# [{'label': 'Business', 'score': 0.93}]: the label is one of Business, Sci/Tech, Sports, World" in card
    assert "| | Business | Sci/Tech | Sports | World |" in card  # the confusion matrix, named


def test_predict_and_demo_show_the_names(trained):
    from dapt.serve.app import WORDS, classify_fn, results_markdown
    from dapt.model.card import measured_results
    from dapt.serve.predict import Predictor

    predictor = Predictor(trained["model"], device="cpu")
    got = predictor.predict(["the bank raised interest rates", "the probe sent images from mars"])
    assert all(p["label"] in NAMES for p in got)
    shown = classify_fn(predictor)("the striker scored twice in the final")
    assert set(shown) == set(NAMES) and sum(shown.values()) == pytest.approx(1.0)
    panel = results_markdown(measured_results(trained["model"]), per_class=True)
    assert "F1 per class:" in panel and "Sci/Tech" in panel
    assert WORDS["classes"]["label"] == "Class"
    gr = pytest.importorskip("gradio")
    from dapt.serve.app import build_demo

    demo = build_demo(str(trained["model"]), device="cpu")
    config = demo.get_config_file() if hasattr(demo, "get_config_file") else demo.config
    text = json.dumps(config)
    assert "dapt text classification demo" in text and "`Sci/Tech`" in text and gr is not None


def test_test_labels_outside_the_models_classes_are_one_line(trained, base_env, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nrain all week,World\nstorms ahead,Weather\n")
    proc = run_cli("evaluate.py", ["--model_name_or_path", trained["model"], "--data_files", bad,
                                   "--output_dir", tmp_path / "e"], base_env, launcher="fork")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dapt: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "1 label(s) outside {0, 1, 2, 3} in column 'label' (first at row 1: 'Weather'" in lines[0]
    assert "the model's classes are Business, Sci/Tech, Sports, World" in lines[0]


def test_evaluation_flags_must_match_the_model(trained, tmp_path):
    from dapt.model.settings import resolve_eval_settings

    cfg = EvalConfig(output_dir=str(tmp_path), model_name_or_path=str(trained["model"]), label_names=["a", "b"])
    with pytest.raises(DaptError, match="the model was trained on the classes Business, Sci/Tech, Sports, World"):
        resolve_eval_settings(cfg, trained["model"])
    cfg = EvalConfig(output_dir=str(tmp_path), model_name_or_path=str(trained["model"]))
    resolve_eval_settings(cfg, trained["model"])
    assert (cfg.num_labels, cfg.label_names) == (4, NAMES)


# --- prepared data carries the classes ----------------------------------------------------------------------

def test_prepare_records_the_classes_and_finetune_reads_them(tmp_path, tiny_model, topic_files, private_cache,
                                                            capsys):
    from transformers import AutoTokenizer

    from dapt.commands.prepare import parse_args
    from dapt.jobs.prepare import prepare
    from dapt.distributed import DistInfo
    from dapt.train.tasks import build_classification_task

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    out = tmp_path / "prep"
    manifest = prepare(*parse_args(["--stage", "finetune", "--output_dir", str(out), "--model_name_or_path",
                                    str(tiny_model), "--data_files", str(topic_files["train"]), "--max_seq_length",
                                    "48", "--head_tokens", "12"]))
    assert manifest["labels"] == {"names": NAMES}
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert sum(train[f"label:{n}"] + val[f"label:{n}"] for n in NAMES) == 160
    assert "Sci/Tech" in capsys.readouterr().out  # the split table's header names the classes
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = FinetuneConfig(output_dir="run", prepared_dir=str(out), max_seq_length=48, head_tokens=12)
    build_classification_task(cfg, info, tok)
    assert (cfg.num_labels, cfg.label_names) == (4, NAMES)
    cfg = FinetuneConfig(output_dir="run", prepared_dir=str(out), max_seq_length=48, head_tokens=12,
                         label_names=["World", "Sports", "Business", "Sci/Tech"])
    with pytest.raises(DaptError, match=r"has the classes Business, Sci/Tech, Sports, World; this run asks for "
                                        r"World Sports Business Sci/Tech"):
        build_classification_task(cfg, info, tok)
