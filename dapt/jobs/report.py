"""`dapt report RUN_DIR`: PNG plots and a Markdown summary from a run's own files.

RUN_DIR is a stage's output dir (holding `metrics.jsonl`), an evaluation's output dir, or a pipeline's
(its `mlm/`, `finetune/` and `eval/`, dapt/layout.py), made by launch/pipeline.py or slurm/pipeline.sh. For each stage: loss (train and held-out), learning rate, gradient
norm, tokens/s, held-out metrics and step time over optimizer steps; for the evaluation: the confusion
matrix. Written to `RUN_DIR/report/` (`--output_dir` to change): `<stage>_training.png`,
`confusion_matrix.png` and `report.md`.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dapt.errors import DaptError
from dapt.eval.metrics import ci_text
from dapt.io import atomic_write_text, read_json, read_jsonl
from dapt.layout import EvalLayout, RunLayout, StageLayout

STAGE_NAMES = {"mlm": "mlm", "classifier": "finetune"}


def find_stages(run_dir: Path) -> list[tuple[str, Path]]:
    """(name, dir) of every training stage: RUN_DIR itself, or a pipeline's stages (dapt/layout.py)."""
    found = []
    for d in [run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir())]:
        layout = StageLayout(d)
        if layout.is_stage():
            stage = (read_json(layout.run_config) or {}).get("stage")
            found.append((STAGE_NAMES.get(stage, d.name if d != run_dir else "run"), d))
    order = {"mlm": 0, "finetune": 1}
    return sorted(found, key=lambda s: order.get(s[0], 2))


def find_eval(run_dir: Path) -> list[tuple[dict[str, Any], Path]]:
    """Every evaluation result of a run: a pipeline's `eval/`, an evaluation dir itself, or a model folder."""
    for folder in (RunLayout(run_dir).eval.root, run_dir, StageLayout(run_dir).model):
        files = EvalLayout(folder).result_files()
        if files:
            return [(read_json(p), p) for p in files]
    return []


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_stage(name: str, records: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    fig.suptitle(f"{name}: {len(train)} logged steps, {len(evals)} evaluations", fontsize=13)

    def panel(ax: Any, title: str, ylabel: str, lines: list[tuple[str, list[float], list[float], str]],
              logy: bool = False) -> None:
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        drawn = False
        for label, xs, ys, style in lines:
            if xs:
                ax.plot(xs, ys, style, label=label, markersize=5)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            values = [v for _, _, ys, _ in lines for v in ys]
            if logy and min(values) > 0 and max(values) / min(values) > 20:  # spans orders of magnitude
                ax.set_yscale("log")
            if len([ln for ln in lines if ln[1]]) > 1:
                ax.legend()
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    panel(axes[0, 0], "loss", "loss", [("train", *_series(train, "loss"), "-"),
                                       ("held-out", *_series(evals, "eval_loss"), "o-")])
    panel(axes[0, 1], "learning rate", "lr", [("lr", *_series(train, "lr"), "-")])
    panel(axes[0, 2], "gradient norm (last step of each window)", "L2 norm",
          [("grad norm", *_series(train, "grad_norm"), "-")], logy=True)
    panel(axes[1, 0], "throughput (all ranks)", "real tokens / s", [("tokens/s", *_series(train, "tokens_per_s"), "-")])
    metric_keys = [k for k in ("eval_accuracy", "eval_f1_macro", "eval_perplexity") if any(k in r for r in evals)]
    panel(axes[1, 1], "held-out metrics", ", ".join(k[5:] for k in metric_keys) or "-",
          [(k[5:], *_series(evals, k), "o-") for k in metric_keys], logy=metric_keys == ["eval_perplexity"])
    panel(axes[1, 2], "time per optimizer step", "seconds", [("step time", *_series(train, "step_time_s"), "-")])
    path = out / f"{name}_training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _set_name(results_path: Path) -> str:
    """`eval_results-<name>.json` -> name; the single set's file -> ""."""
    stem = results_path.stem
    return stem.split("-", 1)[1] if "-" in stem else ""


def plot_confusion(results: dict[str, Any], out: Path, name: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results.get("per_class", {})) or [str(i) for i in range(len(results["confusion_matrix"]))]
    cm = results["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(5.5, 4.8), constrained_layout=True)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                    color="white" if v > peak / 2 else "black")
    ax.set_title(f"confusion matrix: accuracy {results['accuracy']:.4f}, macro-F1 {results['f1_macro']:.4f}\n"
                 f"({results['n_examples']} examples)", fontsize=10)
    path = out / (f"confusion_matrix-{name}.png" if name else "confusion_matrix.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def stage_summary(name: str, d: Path, records: list[dict[str, Any]]) -> list[str]:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    layout = StageLayout(d)
    summary, run = read_json(layout.summary, {}), read_json(layout.run_config, {})
    lines = [f"## {name}", ""]
    if run:
        cfg, ds = run.get("config", {}), run.get("deepspeed", {})
        lines.append(f"ZeRO-{ds.get('zero_optimization', {}).get('stage')} {run.get('precision')} on "
                     f"{run.get('world_size')} x {run.get('device')}; effective batch {cfg.get('effective_batch_size')}, "
                     f"lr {cfg.get('learning_rate')}, {cfg.get('num_epochs')} epoch(s), max length {cfg.get('max_seq_length')}.")
        lines.append("")
    rows = [("optimizer steps", train[-1]["step"] if train else "-"),
            ("epochs", train[-1]["epoch"] if train else "-"),
            ("first / last train loss", f"{train[0]['loss']:.4f} / {train[-1]['loss']:.4f}" if train else "-"),
            ("median tokens/s", f"{statistics.median(r['tokens_per_s'] for r in train):.0f}" if train else "-"),
            ("skipped steps (fp16 overflow)", train[-1].get("skipped_steps", 0) if train else "-")]
    if any("grad_norm" in r for r in train):
        rows.append(("last grad norm", _fmt([r for r in train if "grad_norm" in r][-1]["grad_norm"])))
    if summary:
        rows += [("train time (last job; a resumed run counts from its resume)", f"{summary.get('train_seconds')} s"),
                 ("export check max abs logit diff", _fmt(summary.get("export_max_abs_logit_diff")))]
    for k, v in (evals[-1] if evals else {}).items():
        if k.startswith("eval_") and k != "eval_seconds":
            rows.append((f"held-out {k[5:]} (step {evals[-1]['step']})", _fmt(v)))
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
              f"![{name}]({name}_training.png)", ""]
    return lines


def eval_summary(results: dict[str, Any], path: Path) -> list[str]:
    name = _set_name(path)
    lines = [f"## evaluation{': ' + name if name else ''}", "", f"From `{path}`: {results['n_examples']} examples, max length "
             f"{results.get('max_seq_length')}, truncation {results.get('truncation')}, "
             f"{results.get('world_size')} rank(s).", "",
             "| metric | value [95% CI] |", "|---|---|", f"| accuracy | {ci_text(results, 'accuracy')} |",
             f"| macro F1 | {ci_text(results, 'f1_macro')} |"]
    for label, sc in results.get("per_class", {}).items():
        lines.append(f"| {label} precision / recall / F1 | {sc['precision']:.4f} / {sc['recall']:.4f} / {sc['f1']:.4f} |")
    png = f"confusion_matrix-{name}.png" if name else "confusion_matrix.png"
    lines += ["", f"![confusion matrix]({png})", ""]
    return lines


def make_report(run_dir: str | Path, output_dir: str | Path | None = None) -> dict[str, Any]:
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise DaptError(f"run directory not found: {run_dir}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DaptError("dapt report needs matplotlib: pip install matplotlib") from None
    stages = find_stages(run)
    evaluations = find_eval(run)
    if not stages and not evaluations:
        raise DaptError(f"{run_dir} holds no metrics.jsonl (in it or a subfolder) and no eval_results.json")
    out = Path(output_dir) if output_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs, md = [], [f"# Report: {run.resolve().name}", ""]
    for name, d in stages:
        records = read_jsonl(StageLayout(d).metrics)
        pngs.append(plot_stage(name, records, out))
        md += stage_summary(name, d, records)
    for results, results_path in evaluations:
        if results.get("confusion_matrix"):
            pngs.append(plot_confusion(results, out, _set_name(results_path)))
            md += eval_summary(results, results_path)
    atomic_write_text(out / "report.md", "\n".join(md))
    return {"output_dir": out, "pngs": pngs, "markdown": out / "report.md"}
