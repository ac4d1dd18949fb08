"""Exactness of distributed evaluation: for many data sizes (primes, N < world size) and world sizes
1..4, the all-reduced counts equal a single-process computation and scikit-learn's metrics."""
import json

import pytest
import torch
from conftest import ROOT, assert_ok
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from dapt.data.classify import tokenize_for_classification

SIZES = [1, 2, 3, 5, 7, 11, 13, 16, 31, 37, 64]


def _encoded(demo_files, tok):
    import datasets

    full = datasets.load_dataset("json", data_files=str(demo_files["train"]), split="train")
    return tokenize_for_classification(full.select(range(max(SIZES))), tok, 64, "head+tail", 16)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model, demo_files):
    """A random classifier whose head is rescaled and centred on this data, so that predictions are
    mixed (a random tiny BERT's pooled outputs barely differ between inputs)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(3)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    with torch.no_grad():
        pooled = torch.stack([model.bert(input_ids=torch.tensor([ids])).pooler_output[0]
                              for ids in _encoded(demo_files, tok)["input_ids"]])
        v = torch.randn(pooled.shape[1])
        score = pooled @ v
        scale = 1.0 / score.std()
        model.classifier.weight.zero_()
        model.classifier.weight[1] = v * scale
        model.classifier.bias.zero_()
        model.classifier.bias[1] = -(score * scale).mean()
    out = tmp_path_factory.mktemp("clf")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(classifier, demo_files):
    """Single-process predictions for every example: the ground truth for every N."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(classifier)
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    data = _encoded(demo_files, tok)
    preds = []
    with torch.no_grad():
        for ids in data["input_ids"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            # no near-ties: padding in batched eval changes logits by ~1e-7, never an argmax here
            assert abs(float(logits[0] - logits[1])) > 1e-4
            preds.append(int(logits.argmax()))
    labels = data["label"]
    assert 0 < sum(preds[:37]) < 37, "predictions should be mixed for a meaningful test"
    return labels, preds


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2, 3])  # 3: uneven shards, and N < world for N = 1, 2
def test_counts_are_exact_for_any_size_and_world(world, classifier, demo_files, reference, base_env, tmp_path):
    from ranks import run as run_forked

    out = tmp_path / "res.json"
    cmd = [str(ROOT / "tests" / "workers" / "exact_eval.py"), str(classifier), str(demo_files["train"]), str(out),
           ",".join(map(str, SIZES))]
    # `world` ranks with a launcher's environment (even 1: a process group of one), forked (tests/ranks.py)
    assert_ok(run_forked(cmd, base_env, ranks=world, dist=True))
    got = json.loads(out.read_text())
    assert got["world_size"] == world
    labels, preds = reference
    for n in SIZES:
        y, p = labels[:n], preds[:n]
        for bs in (1, 4, 16):
            res = got["results"][f"{n}/{bs}"]
            assert res["n_examples"] == n
            assert res["confusion_matrix"] == confusion_matrix(y, p, labels=[0, 1]).tolist(), (n, bs)
            assert res["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
            assert res["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", labels=[0, 1], zero_division=0),
                                                    abs=1e-12)
            # per-example predictions: every example once, in input order, gathered from all ranks
            rows = res["predictions"]
            assert [r["row"] for r in rows] == list(range(n)), (n, bs)
            assert [r["predicted"] for r in rows] == [["negative", "positive"][k] for k in p]
            assert [r["label"] for r in rows] == [["negative", "positive"][k] for k in y]
            assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
