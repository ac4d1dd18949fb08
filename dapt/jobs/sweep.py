"""`dapt summarize DIR`: what a sweep (seeds x settings) measured, with the spread over seeds.

One fine-tuning seed is one draw: the seed-to-seed spread of BERT fine-tuning is often as large as the
effect being claimed. This module finds every run under DIR (any depth; a run is a directory with
`eval/eval_results.json` beside a `finetune/` whose `run_config.json` holds its config, dapt/layout.py's
RunLayout), reads each run's setting and seed, and writes to DIR (or `--output_dir`):

    sweep_results.json   every run (setting, seed, accuracy and macro-F1 with their 95% intervals from
                         the results file) and per setting: n runs, mean, sample std and the 95%
                         interval of the mean, a Student-t interval on the logit scale that stays
                         inside [0, 1] (dapt/eval/stats.py bounded_mean_interval), with a note when
                         it says little (fewer than 3 seeds, or wider than 0.2) or is absent (n = 1)
    sweep.md             the same as two Markdown tables
    sweep.png            per setting: each seed's score, the mean and its interval, n

A run's setting is its fine-tune learning rate plus every config key whose value differs between the
runs, except the seed and the keys that do not change what is trained (output paths, W&B, logging,
checkpoint cadence: IGNORED). `model_name_or_path` counts with the run's own seed masked out
(`mlm-seed3` -> `mlm-seed*`): per-seed MLM stages are one setting, two different start models two.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

from dapt.errors import DaptError
from dapt.eval.metrics import CONFIDENCE, ci_text
from dapt.eval.stats import BOUNDED_METHOD, bounded_mean_interval
from dapt.io import atomic_write_text, dump_json, read_json
from dapt.layout import RunLayout, SweepLayout
from dapt.version import __version__

METRICS = {"accuracy": "accuracy", "f1_macro": "macro-F1"}
# Config keys that differ between runs without changing what is trained or measured: where files go,
# how a run is logged, watched, checkpointed or restarted, and how many processes tokenise.
IGNORED = frozenset({
    "seed", "output_dir", "overwrite_output_dir", "resume", "wandb_mode", "wandb_project", "wandb_group",
    "wandb_name", "progress", "logging_steps", "save_steps", "keep_last", "pin_checkpoints", "num_workers",
    "num_proc", "peak_tflops",
})
ALWAYS = ("learning_rate",)  # part of every setting, even when all runs share it
# When a setting's interval of the mean says little, its note says so: with fewer than MIN_SEEDS seeds (t
# quantile 12.7 at n = 2, 4.3 at n = 3, and one or two degrees of freedom for the spread itself), or when it is
# wider than MAX_WIDTH, a fifth of the [0, 1] scale: far wider than any effect a sweep is run to resolve.
MIN_SEEDS = 3
MAX_WIDTH = 0.2
INTERVAL = (f"Student-t interval of the mean on the logit scale ({BOUNDED_METHOD}: logit(mean) +- t(n-1) s / "
            f"(sqrt(n) mean (1 - mean)), mapped back; inside [0, 1])")


def find_runs(root: Path) -> list[Path]:
    """Every run directory under `root` (itself included), sorted by path."""
    runs = []
    for results in sorted(root.rglob(RunLayout(root).eval.results.name)):
        run = RunLayout(results.parent.parent)
        if results == run.eval.results and run.finetune.run_config.is_file():
            runs.append(run.root)
    return runs


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True)


def _comparable(key: str, value: Any, seed: int) -> Any:
    """A config value as runs are compared: a start model's path with the run's own seed masked."""
    if key == "model_name_or_path" and isinstance(value, str):
        return re.sub(rf"seed{seed}(?![0-9])", "seed*", value)
    return value


def read_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One run: its fine-tune config, seed and evaluation results."""
    run = RunLayout(run_dir)
    config = (read_json(run.finetune.run_config) or {}).get("config")
    if not isinstance(config, dict) or "seed" not in config:
        raise DaptError(f"{run.finetune.run_config} holds no fine-tune config (a dapt run_config.json?)")
    results = read_json(run.eval.results) or {}
    missing = [k for k in ("accuracy", "f1_macro", "n_examples") if k not in results]
    if missing:
        raise DaptError(f"{run.eval.results} has no {', '.join(missing)} (a dapt eval_results.json?)")
    seed = int(config["seed"])
    where = run_dir.relative_to(root) if run_dir.is_relative_to(root) else run_dir  # runs given from elsewhere
    record = {"run": str(where), "seed": seed,
              "n_examples": results["n_examples"], "test_set": results.get("set"),
              "config": {k: _comparable(k, v, seed) for k, v in config.items()}}
    for key in METRICS:
        record[key] = float(results[key])
        record[f"{key}_ci"] = results.get(f"{key}_ci")
    return record


def setting_keys(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The config keys that make a setting: learning_rate, and every key whose value differs between runs."""
    keys = sorted({k for r in runs for k in r["config"]} - IGNORED)
    differing = [k for k in keys if len({_hashable(r["config"].get(k)) for r in runs}) > 1]
    return [*ALWAYS, *(k for k in differing if k not in ALWAYS)]


def setting_label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def _group(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting (in order of first appearance): n, seeds and each metric's mean, std and t interval."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_hashable(r["setting"]), []).append(r)
    out = []
    for members in groups.values():
        entry = {"setting": members[0]["setting"], "label": members[0]["label"], "n": len(members),
                 "seeds": [r["seed"] for r in members], "runs": [r["run"] for r in members]}
        for key in METRICS:
            stats = bounded_mean_interval([r[key] for r in members], CONFIDENCE)
            entry[key] = {**stats, "note": interval_note(stats)}
        out.append(entry)
    return out


def interval_note(stats: dict[str, Any]) -> str | None:
    """None for an interval worth reading, else why not: no interval (n = 1), too few seeds, too wide."""
    n = stats["n"]
    if stats["ci_low"] is None:
        return f"no interval: n = {n}"
    if n < MIN_SEEDS:
        return f"uninformative: n = {n} (< {MIN_SEEDS} seeds)"
    width = stats["ci_high"] - stats["ci_low"]
    if width > MAX_WIDTH:
        return f"uninformative: width {width:.2f} (> {MAX_WIDTH:g})"
    return None


def collect(root: Path, runs: Sequence[Path] | None = None) -> dict[str, Any]:
    """The sweep's summary (what sweep_results.json holds) from `runs`, else every run under `root`."""
    run_dirs = find_runs(root) if runs is None else [Path(r).resolve() for r in runs]
    if not run_dirs:
        raise DaptError(f"no runs under {root}: a run is a directory with eval/eval_results.json and "
                        "finetune/run_config.json (launch/pipeline.py --seeds, slurm/sweep.sh)")
    records = [read_run(d, root) for d in run_dirs]
    keys = setting_keys(records)
    if len({r["test_set"] for r in records}) > 1:  # runs scored on different test sets are not one setting
        keys.append("test_set")
    for r in records:
        config = r.pop("config")
        r["setting"] = {k: (r["test_set"] if k == "test_set" else config.get(k)) for k in keys}
        r["label"] = setting_label(r["setting"])
    records.sort(key=lambda r: (_sort_key(r["setting"]), r["seed"], r["run"]))
    return {"root": str(root), "confidence": CONFIDENCE, "setting_keys": keys, "runs": records,
            "settings": _group(records),
            "interval": {"level": CONFIDENCE, "method": BOUNDED_METHOD, "description": INTERVAL,
                         "min_seeds": MIN_SEEDS, "max_width": MAX_WIDTH},
            "dapt_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _sort_key(setting: dict[str, Any]) -> list[tuple[int, Any]]:
    # numbers by value, everything else by its JSON text (None and strings never compare with floats)
    return [(0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, _hashable(v))
            for v in setting.values()]


def _mean_text(stats: dict[str, Any]) -> str:
    std = "-" if stats["std"] is None else f"{stats['std']:.4f}"
    return f"{stats['mean']:.4f} ± {std}"


def interval_text(stats: dict[str, Any], emphasis: str = "") -> str:
    """`[0.8123, 0.9011] (n = 3)`, then the note when there is one (wrapped in `emphasis`: `**` in Markdown);
    `no interval (n = 1)` for one run."""
    if stats["ci_low"] is None:
        return f"no interval (n = {stats['n']})"
    text = f"[{stats['ci_low']:.4f}, {stats['ci_high']:.4f}] (n = {stats['n']})"
    note = stats.get("note")
    return f"{text} {emphasis}{note}{emphasis}" if note else text


def setting_lines(summary: dict[str, Any]) -> list[str]:
    """Per setting one line: `label: accuracy 0.8300 [0.7460, 0.8983] (n = 3); macro-F1 ...` (dapt summarize)."""
    return [f"{s['label']}: " + "; ".join(f"{title} {s[key]['mean']:.4f} {interval_text(s[key])}"
                                          for key, title in METRICS.items())
            for s in summary["settings"]]


def markdown(summary: dict[str, Any], plot_name: str) -> str:
    level = f"{summary['confidence']:.0%}"
    lines = [f"# Sweep: {Path(summary['root']).name}", "",
             f"{len(summary['runs'])} runs in {len(summary['settings'])} setting(s) under `{summary['root']}`; "
             f"setting = {', '.join(summary['setting_keys'])}.", "",
             "## Per setting", "",
             f"Mean ± sample std over the seeds; {level} {INTERVAL}, n = seeds. Marked uninformative with fewer "
             f"than {MIN_SEEDS} seeds or when wider than {MAX_WIDTH:g}; no interval for one run.", "",
             f"| setting | runs | seeds | accuracy mean ± std | accuracy {level} CI | macro-F1 mean ± std | "
             f"macro-F1 {level} CI |", "|---|---:|---|---|---|---|---|"]
    for s in summary["settings"]:
        seeds = " ".join(map(str, s["seeds"]))
        lines.append(f"| {s['label']} | {s['n']} | {seeds} | {_mean_text(s['accuracy'])} | "
                     f"{interval_text(s['accuracy'], '**')} | {_mean_text(s['f1_macro'])} | "
                     f"{interval_text(s['f1_macro'], '**')} |")
    lines += ["", "## Per run", "",
              f"Each run's test scores with their {level} intervals (accuracy: Wilson; macro-F1: bootstrap).", "",
              f"| setting | seed | examples | accuracy [{level} CI] | macro-F1 [{level} CI] | run |",
              "|---|---:|---:|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['label']} | {r['seed']} | {r['n_examples']} | {ci_text(r, 'accuracy')} | "
                     f"{ci_text(r, 'f1_macro')} | `{r['run']}` |")
    lines += ["", f"![per-seed scores]({plot_name})", ""]
    return "\n".join(lines)


def figure(summary: dict[str, Any]) -> Any:
    """The sweep plot as a matplotlib Figure (plot() saves it). Per metric and setting: each seed's score as a
    point, the mean with its bounded interval as an error bar (faded and dashed when its note calls it
    uninformative), n under the setting; the y axis ends at 0 and 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = summary["settings"]
    level = f"{summary['confidence']:.0%}"
    width = max(6.0, 1.6 * len(settings) + 3.0)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(width * len(METRICS) / 1.5, 4.6), constrained_layout=True,
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], METRICS.items()):
        labelled = set()
        for i, s in enumerate(settings):
            scores = [r[key] for r in summary["runs"] if r["run"] in s["runs"]]
            offsets = [(j - (len(scores) - 1) / 2) * 0.08 for j in range(len(scores))]  # seeds side by side
            ax.scatter([i + o for o in offsets], scores, s=28, alpha=0.75, color="tab:blue",
                       label="one seed" if i == 0 else None, zorder=3)
            stats = s[key]
            if stats["ci_low"] is None:
                label = f"mean, no interval (n = {stats['n']})"
                ax.plot([i + 0.3], [stats["mean"]], "o", color="tab:red", zorder=4,
                        label=None if label in labelled else label)
                labelled.add(label)
                continue
            weak = stats.get("note") is not None
            label = f"mean, {level} logit-t interval" + (" (uninformative)" if weak else "")
            bars = ax.errorbar([i + 0.3], [stats["mean"]], yerr=[[stats["mean"] - stats["ci_low"]],
                                                                 [stats["ci_high"] - stats["mean"]]],
                               fmt="o", color="tab:red", capsize=5, alpha=0.45 if weak else 1.0, zorder=4,
                               label=None if label in labelled else label)
            labelled.add(label)
            if weak:
                bars.lines[2][0].set_linestyle("--")
        ax.set_xticks(range(len(settings)),
                      [s["label"].replace(", ", "\n") + f"\nn = {s['n']}" for s in settings], fontsize=8)
        ax.set_xlim(-0.6, len(settings) - 0.4)
        low, high = ax.get_ylim()  # a proportion: no room drawn below 0 or above 1
        ax.set_ylim(max(low, -0.01), min(high, 1.01))
        ax.set_ylabel(title)
        ax.set_title(f"test {title} per seed ({len(summary['runs'])} runs)")
        ax.grid(alpha=0.3, axis="y")
        if settings:
            ax.legend(fontsize=8, loc="best")
    return fig


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Save figure(summary) to `path` (PNG)."""
    fig = figure(summary)  # first: it picks the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarize(root: str | Path, output_dir: str | Path | None = None,
              runs: Sequence[Path] | None = None) -> dict[str, Any]:
    """Find the runs under `root` (or take `runs`), write sweep_results.json, sweep.md and sweep.png to
    `output_dir` (default `root`; dapt/layout.py SweepLayout) and return the summary, with "files"."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DaptError(f"sweep directory not found: {root}")
    summary = collect(root, runs)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DaptError("dapt summarize needs matplotlib: pip install matplotlib") from None
    out = SweepLayout(Path(output_dir).expanduser().resolve() if output_dir else root)
    out.root.mkdir(parents=True, exist_ok=True)
    summary["files"] = {"results": str(out.results), "markdown": str(out.markdown), "plot": str(out.plot)}
    plot(summary, out.plot)
    atomic_write_text(out.markdown, markdown(summary, out.plot.name))
    dump_json(summary, out.results)  # last: its presence means the other two are complete
    return summary
