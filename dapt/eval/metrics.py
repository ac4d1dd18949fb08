"""Classification metrics computed once from an exact confusion matrix.

Macro-F1 cannot be averaged over ranks; confusion counts can be summed. Ranks add their counts
(all-reduce) and the metrics come from the totals.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from dapt.eval.stats import bootstrap_macro_f1_interval, wilson_interval

CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0


def confusion_counts(labels: torch.Tensor, preds: torch.Tensor, num_labels: int) -> torch.Tensor:
    """counts[true, predicted] as int64."""
    flat = labels.long().flatten() * num_labels + preds.long().flatten()
    return torch.bincount(flat, minlength=num_labels * num_labels).view(num_labels, num_labels)


def metrics_from_confusion(counts: torch.Tensor, id2label: Mapping[int, str]) -> dict[str, Any]:
    """accuracy, macro-F1, per-class precision/recall/F1/support (0 where undefined, as scikit-learn's
    zero_division=0), and the matrix itself."""
    c = counts.long().cpu()
    n = int(c.sum())
    tp = c.diag()
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for k in range(c.shape[0]):
        predicted, actual = int(c[:, k].sum()), int(c[k, :].sum())
        precision = int(tp[k]) / predicted if predicted else 0.0
        recall = int(tp[k]) / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[id2label[k]] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {
        "accuracy": int(tp.sum()) / n if n else 0.0,
        "f1_macro": sum(f1s) / len(f1s),
        "n_examples": n,
        "confusion_matrix": c.tolist(),
        "per_class": per_class,
    }


def add_intervals(results: dict[str, Any]) -> dict[str, Any]:
    """95% intervals from the exact counts: Wilson for accuracy; for macro-F1 a seeded bootstrap that
    resamples the confusion matrix as a multinomial over its cells (2,000 draws)."""
    n = results["n_examples"]
    correct = sum(results["confusion_matrix"][k][k] for k in range(len(results["confusion_matrix"])))
    results["accuracy_ci"] = list(wilson_interval(correct, n, CONFIDENCE))
    results["f1_macro_ci"] = list(bootstrap_macro_f1_interval(results["confusion_matrix"], BOOTSTRAP_DRAWS,
                                                              BOOTSTRAP_SEED, CONFIDENCE))
    results["ci"] = {"level": CONFIDENCE, "accuracy": "Wilson score interval",
                     "f1_macro": f"bootstrap percentile, confusion matrix resampled as a multinomial, "
                                 f"{BOOTSTRAP_DRAWS} draws, seed {BOOTSTRAP_SEED}"}
    return results


def ci_text(results: Mapping[str, Any], key: str, digits: int = 4) -> str:
    """`0.9123 [0.9010, 0.9228]` (the value, then its 95% interval when known)."""
    value, ci = results[key], results.get(f"{key}_ci")
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text report: per-class rows, then accuracy and macro-F1, then the matrix."""
    names = list(results["per_class"])
    width = max(10, *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    for name in names:
        r = results["per_class"][name]
        lines.append(f"{name:<{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1']:>9.4f} {r['support']:>9d}")
    lines.append(f"{'accuracy':<{width}} {results['accuracy']:>9.4f} {'':>9} {'':>9} {results['n_examples']:>9d}")
    lines.append(f"{'macro f1':<{width}} {'':>9} {'':>9} {results['f1_macro']:>9.4f}")
    if "accuracy_ci" in results:
        lines.append(f"95% intervals: accuracy {ci_text(results, 'accuracy')} (Wilson), "
                     f"macro-F1 {ci_text(results, 'f1_macro')} (bootstrap)")
    lines.append("confusion matrix (rows: true, columns: predicted; order " + ", ".join(names) + ")")
    lines.extend("  " + " ".join(f"{v:>8d}" for v in row) for row in results["confusion_matrix"])
    return "\n".join(lines)
