import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from dapt.config import ID2LABEL
from dapt.eval.metrics import confusion_counts, format_table, metrics_from_confusion


@pytest.mark.parametrize("seed", range(20))
def test_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    y = rng.integers(0, 2, n)
    # some seeds predict a single class: zero-division paths
    p = rng.integers(0, 2, n) if seed % 4 else np.full(n, seed % 2)
    res = metrics_from_confusion(confusion_counts(torch.tensor(y), torch.tensor(p), 2), ID2LABEL)
    assert res["n_examples"] == n
    assert res["confusion_matrix"] == confusion_matrix(y, p, labels=[0, 1]).tolist()
    assert res["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert res["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", labels=[0, 1], zero_division=0), abs=1e-12)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=[0, 1], zero_division=0)
    for k, name in ID2LABEL.items():
        assert res["per_class"][name]["precision"] == pytest.approx(prec[k], abs=1e-12)
        assert res["per_class"][name]["recall"] == pytest.approx(rec[k], abs=1e-12)
        assert res["per_class"][name]["f1"] == pytest.approx(f1[k], abs=1e-12)
        assert res["per_class"][name]["support"] == sup[k]


def test_table_lists_every_class_and_totals():
    res = metrics_from_confusion(torch.tensor([[3, 1], [2, 4]]), ID2LABEL)
    table = format_table(res)
    assert "negative" in table and "positive" in table and "0.7000" in table and " 10" in table
