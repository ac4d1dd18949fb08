"""The model card (README.md) of an exported model folder.

Export writes `dapt_training.json` (what the card is made from: the recipe, data, engine settings and
held-out metrics, all read from the run's own files) and renders README.md from it. The evaluation
job adds each test set's results to the folder (`results/<set>.json`) and renders the card again, so every number in the
card comes from a file the run wrote, never from a hand-typed value.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from dapt.data.labels import is_default_binary
from dapt.io import atomic_write_text, dump_json, read_jsonl
from dapt.model.loading import PACKAGED_MODELS
from dapt.version import __version__

CARD_DATA = "dapt_training.json"
RESULTS_DIR = "results"  # one file per evaluated test set: results/<set>.json
LOCK_FILE = ".card.lock"
HUB_DATASET_TYPES = {"stanfordnlp/imdb": "imdb", "imdb": "imdb"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _data_description(cfg: Mapping[str, Any]) -> dict[str, Any]:
    if cfg.get("prepared_dir"):
        source = _read_json(Path(cfg["prepared_dir"]) / "manifest.json").get("source", {})
        return {"kind": "prepared", "name": Path(cfg["prepared_dir"]).name,
                "inputs": [Path(str(i.get("path", i))).name if isinstance(i, dict) else Path(str(i)).name
                           for i in source.get("inputs", [])] if isinstance(source, dict) else []}
    if cfg.get("data_files"):
        return {"kind": "files", "inputs": [Path(f).name for f in cfg["data_files"]],
                "split": cfg.get("dataset_split")}
    return {"kind": "hub", "name": cfg.get("dataset_name"), "split": cfg.get("dataset_split")}


def _last_validation(run_dir: Path, step: int) -> dict[str, Any]:
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl")
             if any(k.startswith("eval_") for k in r) and r.get("step", 0) <= step]
    return evals[-1] if evals else {}


def _selection(tag_dir: Path) -> dict[str, Any] | None:
    latest = tag_dir.parent / "latest"
    if not latest.is_file():
        return None
    selection = _read_json(tag_dir.parent / latest.read_text().strip() / "dapt_state.json").get("selection")
    return selection if selection and selection.get("metric", "none") != "none" else None


def collect(tag_dir: Path, meta: Mapping[str, Any], model: Any) -> dict[str, Any]:
    """What the card says, from the checkpoint and its run directory (run_config.json, metrics.jsonl)."""
    run_dir = tag_dir.parent.parent
    run = _read_json(run_dir / "run_config.json")
    cfg = run.get("config", {})
    state = _read_json(tag_dir / "dapt_state.json")
    position = state.get("position", {})
    ds = run.get("deepspeed", {})
    base = cfg.get("model_name_or_path") or run.get("model")
    lineage = None
    if base:
        for cand in (Path(str(base)), Path(str(base)) / "model", Path(str(run.get("model", ""))) if run.get("model") else None):
            if cand is not None and (cand / CARD_DATA).is_file():
                parent = _read_json(cand / CARD_DATA)
                lineage = {k: parent.get(k) for k in ("arch", "base_model", "data", "steps", "recipe", "validation")}
                break
    mc = model.config
    recipe_keys = ("learning_rate", "num_epochs", "effective_batch_size", "micro_batch_size", "warmup",
                   "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "max_seq_length",
                   "truncation", "head_tokens", "mlm_probability", "validation_split", "max_samples", "seed")
    return {
        "arch": meta.get("arch"),
        "settings": dict(meta.get("dapt", {})),
        "dapt_version": run.get("dapt_version", __version__),
        "exported": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "checkpoint": tag_dir.name,
        "steps": position.get("step"),
        "epochs_completed": position.get("epoch"),
        "base_model": base,
        "lineage": lineage,
        "data": _data_description(cfg) if cfg else {},
        "recipe": {k: cfg[k] for k in recipe_keys if k in cfg},
        "engine": {"zero_stage": ds.get("zero_optimization", {}).get("stage"), "precision": run.get("precision"),
                   "world_size": run.get("world_size"), "device": run.get("device"),
                   "gradient_accumulation_steps": ds.get("gradient_accumulation_steps"),
                   "warmup_steps": ds.get("scheduler", {}).get("params", {}).get("warmup_num_steps")},
        "model": {"type": getattr(mc, "model_type", None), "layers": getattr(mc, "num_hidden_layers", None),
                  "hidden_size": getattr(mc, "hidden_size", None),
                  "max_position_embeddings": getattr(mc, "max_position_embeddings", None),
                  "parameters": int(sum(p.numel() for p in model.parameters())),
                  "labels": {str(k): v for k, v in (getattr(mc, "id2label", None) or {}).items()}},
        "validation": _last_validation(run_dir, position.get("step", 10**12)) if run else {},
        # --select_best: which step was exported and why (dapt/train/selection.py), as the run's newest
        # checkpoint knows it (all evaluations so far)
        "selection": _selection(tag_dir) or state.get("selection"),
    }


def write_card(model_dir: Path, data: Mapping[str, Any]) -> Path:
    """Store the card data beside the weights and render README.md (with any measured results there)."""
    model_dir = Path(model_dir)
    dump_json(data, model_dir / CARD_DATA)
    return render_to(model_dir)


def render_to(model_dir: Path) -> Path:
    data = _read_json(model_dir / CARD_DATA)
    path = model_dir / "README.md"
    resolved = model_dir.resolve()
    # a stage's export is `<run>/<stage>/model`: name it after the run and stage, not "model"
    name = f"{resolved.parent.parent.name}-{resolved.parent.name}" if resolved.name == "model" else resolved.name
    atomic_write_text(path, render(data, measured_results(model_dir), name))
    return path


def measured_results(model_dir: str | Path) -> list[dict[str, Any]]:
    """Every test set this model was evaluated on (`results/<set>.json`), sorted by set name."""
    folder = Path(model_dir) / RESULTS_DIR
    found = [_read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return sorted((r for r in found if r.get("set")), key=lambda r: r["set"])


@contextlib.contextmanager
def _card_lock(model_dir: Path) -> Iterator[None]:
    """One writer at a time: two evaluation jobs of one model (a Slurm array, say) each add their set and
    render the card; under the lock the later render sees both sets."""
    with open(model_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_results(model_dir: str | Path, results: Mapping[str, Any]) -> Path | None:
    """The evaluation job: store one set's measured results in a dapt model folder (`results/<set>.json`,
    replacing only that set's entry) and re-render its card. Folders that dapt did not export (no
    dapt_training.json) are left alone."""
    model_dir = Path(model_dir)
    if not (model_dir / CARD_DATA).is_file():
        return None
    try:
        with _card_lock(model_dir):
            (model_dir / RESULTS_DIR).mkdir(exist_ok=True)
            dump_json(dict(results), model_dir / RESULTS_DIR / f"{results['set']}.json")
            return render_to(model_dir)
    except OSError as exc:  # e.g. a read-only shared model folder: the eval dir's results file is what matters
        print(f"warning: model card of {model_dir} not updated ({exc})", flush=True)
        return None


# --- rendering ------------------------------------------------------------------------------------

def _ci(r: Mapping[str, Any], key: str) -> str:
    ci = r.get(f"{key}_ci")
    return f"{r[key]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def _results_section(results: list[dict[str, Any]]) -> list[str]:
    """Per test set: accuracy and macro-F1 with 95% intervals, then each set's details."""
    out = ["Test sets (each example evaluated exactly once; 95% intervals: Wilson for accuracy, a bootstrap of the "
           f"confusion matrix for macro-F1; numbers from `{RESULTS_DIR}/<set>.json` in this folder):", "",
           "| set | examples | accuracy [95% CI] | macro-F1 [95% CI] |", "|---|---:|---|---|"]
    out += [f"| {r['set']} | {r['n_examples']} | {_ci(r, 'accuracy')} | {_ci(r, 'f1_macro')} |" for r in results]
    for r in results:
        names = list(r.get("per_class", {}))
        out += ["", f"### {r['set']}", "",
                f"Data: {_eval_data_name(r)}; {r.get('world_size')} rank(s), {r.get('precision')}, max length "
                f"{r.get('max_seq_length')}, truncation {r.get('truncation')}.", "",
                "| class | precision | recall | F1 | support |", "|---|---|---|---|---:|"]
        out += [f"| {k} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                for k, v in r.get("per_class", {}).items()]
        out += ["", "Confusion matrix (rows: true, columns: predicted):", "",
                "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        out += [f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |"
                for i, row in enumerate(r.get("confusion_matrix", []))]
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v) or "-"
    return "-" if v is None or v == "" else str(v)


def _data_line(d: Mapping[str, Any]) -> str:
    if not d:
        return "unknown (the checkpoint's run_config.json was not found)"
    if d.get("kind") == "hub":
        return f"Hugging Face dataset `{d.get('name')}`, split `{d.get('split')}`"
    if d.get("kind") == "prepared":
        ins = f" (from {_fmt(d.get('inputs'))})" if d.get("inputs") else ""
        return f"a directory prepared by `dapt prepare` (`{d.get('name')}`){ins}"
    return "local files: " + ", ".join(f"`{x}`" for x in d.get("inputs", []))


def _eval_data_name(results: Mapping[str, Any]) -> str:
    data = results.get("data")
    if isinstance(data, list):
        return ", ".join(Path(str(x)).name for x in data)
    return str(data)


def _classes(data: Mapping[str, Any]) -> list[str]:
    """The classifier's class names in id order (config.json's id2label, as collected)."""
    labels = (data.get("model") or {}).get("labels") or {}
    return [v for _, v in sorted((int(k), v) for k, v in labels.items())]


def _sentiment(data: Mapping[str, Any]) -> bool:
    """The binary negative/positive classifier (IMDB): its card keeps the sentiment wording."""
    names = _classes(data)
    return not names or is_default_binary(names)


def _index_entry(r: Mapping[str, Any], sentiment: bool = True) -> dict[str, Any]:
    """One model-index result: keyed by the data set's name and split."""
    ds_name = str(r.get("data", ""))
    hub = ds_name.split(":")[0] if ":" in ds_name and not isinstance(r.get("data"), list) else ""
    return {"task": {"type": "text-classification",
                     "name": "Sentiment classification" if sentiment else "Text classification"},
            "dataset": {"name": r.get("set") or _eval_data_name(r), "type": HUB_DATASET_TYPES.get(hub, hub or "local"),
                        **({"split": r["split"]} if r.get("split") else {})},
            "metrics": [{"type": "accuracy", "value": r["accuracy"],
                         **({"args": {"ci95": r["accuracy_ci"]}} if r.get("accuracy_ci") else {})},
                        {"type": "f1", "name": "macro F1", "value": r["f1_macro"],
                         "args": {"average": "macro", **({"ci95": r["f1_macro_ci"]} if r.get("f1_macro_ci") else {})}}]}


def _front_matter(data: Mapping[str, Any], results: list[dict[str, Any]], name: str) -> str:
    classifier = data.get("arch") == "classifier"
    meta: dict[str, Any] = {"language": ["en"], "library_name": "transformers",
                            "pipeline_tag": "text-classification" if classifier else "fill-mask",
                            "tags": ["dapt", "deepspeed", "bert", "domain-adaptive-pretraining"]
                            + (["sentiment-analysis"] if classifier and _sentiment(data) else [])}
    d = data.get("data", {})
    if d.get("kind") == "hub" and d.get("name"):
        meta["datasets"] = [d["name"]]
    base = str(data.get("base_model") or "")

    if (base and base not in PACKAGED_MODELS and not base.startswith((".", "/", "~")) and base.count("/") <= 1
            and not Path(base).exists()):  # a hub id
        meta["base_model"] = base
    if results and classifier:
        meta["model-index"] = [{"name": name, "results": [_index_entry(r, _sentiment(data)) for r in results]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def render(data: Mapping[str, Any], results: list[dict[str, Any]], name: str) -> str:
    classifier = data.get("arch") == "classifier"
    s, rec, eng, m = data.get("settings", {}), data.get("recipe", {}), data.get("engine", {}), data.get("model", {})
    max_len = s.get("max_seq_length") or rec.get("max_seq_length")
    lin = data.get("lineage")
    out = [_front_matter(data, results, name), f"# {data.get('title') or name}", ""]
    classes, sentiment = _classes(data), _sentiment(data)
    if classifier and not sentiment:
        out.append(f"A BERT-family text classifier with {len(classes)} classes ("
                   + ", ".join(f"`{v}`" for v in classes) + "), fine-tuned with dapt on DeepSpeed"
                   + (" after domain-adaptive masked-language-model pretraining." if lin and lin.get("arch") == "mlm"
                      else "."))
    elif classifier:
        out.append("A BERT-family sentiment classifier for English movie reviews (labels "
                   + ", ".join(f"`{v}`" for v in m.get("labels", {}).values()) + "), fine-tuned with dapt on "
                   "DeepSpeed" + (" after domain-adaptive masked-language-model pretraining on review text."
                                  if lin and lin.get("arch") == "mlm" else "."))
    else:
        out.append("A BERT-family masked language model adapted to English movie-review text by continued "
                   "masked-language-model pretraining (dapt, on DeepSpeed). It is a starting point for "
                   "fine-tuning, not a classifier.")
    out += ["", "## Model", "",
            f"* Architecture: {m.get('type')} ({m.get('layers')} layers, hidden size {m.get('hidden_size')}, "
            f"{m.get('parameters', 0) / 1e6:.1f}M parameters), exported as FP32 safetensors.",
            f"* Started from: `{data.get('base_model')}`"]
    if lin:
        out.append(f"  (itself a dapt {lin.get('arch')} model: {lin.get('steps')} steps from `{lin.get('base_model')}` "
                   f"on {_data_line(lin.get('data') or {})})")
    out += [f"* Exported from checkpoint `{data.get('checkpoint')}` on {data.get('exported')} by dapt "
            f"{data.get('dapt_version')}.", ""]
    if classifier and not sentiment:  # the binary card predates this section and stays as it was
        out += ["## Classes", "", "| id | name |", "|---:|---|", *(f"| {i} | {v} |" for i, v in enumerate(classes)),
                "", "Predictions, `transformers.pipeline` and `dapt predict` show these names (config.json: "
                "`id2label` / `label2id`).", ""]
    out += ["## Training data", "", f"* {_data_line(data.get('data', {}))}"]
    if rec.get("max_samples"):
        out.append(f"* a seeded random subset of {rec['max_samples']} examples")
    if rec.get("validation_split"):
        out.append(f"* {rec['validation_split']:.0%} held out for validation (seed {rec.get('seed')})")
    out += ["", "## Training procedure", "", "| setting | value |", "|---|---|"]
    rows = [("objective", "masked-language-model (BERT 80/10/10 masking, p = "
             f"{_fmt(rec.get('mlm_probability'))})" if not classifier else f"cross-entropy, {len(classes) or 2} labels"),
            ("optimizer", f"AdamW (betas {_fmt(rec.get('adam_beta1'))}, {_fmt(rec.get('adam_beta2'))}; "
             f"eps {_fmt(rec.get('adam_epsilon'))}; weight decay {_fmt(rec.get('weight_decay'))}, none on biases/LayerNorm)"),
            ("learning rate", f"{_fmt(rec.get('learning_rate'))}, linear warmup ({_fmt(eng.get('warmup_steps'))} steps) "
             "then linear decay"),
            ("epochs / optimizer steps", f"{_fmt(rec.get('num_epochs'))} / {_fmt(data.get('steps'))}"),
            ("effective batch", f"{_fmt(rec.get('effective_batch_size'))} (micro-batch {_fmt(rec.get('micro_batch_size'))}"
             f" x {_fmt(eng.get('gradient_accumulation_steps'))} accumulation x {_fmt(eng.get('world_size'))} ranks)"),
            ("gradient clipping", _fmt(rec.get("max_grad_norm"))),
            ("max sequence length", _fmt(max_len)),
            ("DeepSpeed", f"ZeRO stage {_fmt(eng.get('zero_stage'))}, {_fmt(eng.get('precision'))}, "
             f"{_fmt(eng.get('world_size'))} x {_fmt(eng.get('device'))}"),
            ("seed", _fmt(rec.get("seed")))]
    if classifier:
        rows.insert(6, ("truncation", f"{s.get('truncation')}" + (f" (first {s.get('head_tokens')} tokens + the end)"
                                                                 if s.get("truncation") == "head+tail" else "")))
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "## Evaluation", ""]
    val = data.get("validation") or {}
    sel = data.get("selection") or {}
    if sel.get("best_step") is not None:
        out += [f"Exported checkpoint: the best of {sel.get('evaluations')} evaluations by held-out "
                f"{sel['metric']} ({sel['best_value']:.6g} at step {sel['best_step']}; `--select_best "
                f"{sel['metric']}`" + (f", early stopping after {sel['patience']} evaluations without improvement"
                                       if sel.get("patience") else "") + ").", ""]
    if val:
        shown = {k[5:]: v for k, v in val.items() if k.startswith("eval_") and k != "eval_seconds"}
        out.append(f"Held-out validation split at step {val.get('step')} (from the run's `metrics.jsonl`): "
                   + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()) + ".")
        out.append("")
    if classifier and results:
        out += _results_section(results)
    elif classifier:
        out.append("Not evaluated on a test set yet: `dapt evaluate --model_name_or_path <this folder>` measures "
                   "it and fills in this section.")
    out += ["", "## How to use", "", "```python", "from transformers import pipeline", ""]
    if classifier:
        out += ['clf = pipeline("text-classification", model="path/to/this/folder")',
                'clf("A wonderful film with a superb cast.", truncation=True)' if sentiment else
                'clf("Some text to classify.", truncation=True)',
                *([f"# [{{'label': '{classes[0]}', 'score': 0.93}}]: the label is one of "
                   + ", ".join(classes)] if not sentiment else []), "```", "",
                f"or `dapt predict --model path/to/this/folder \"some {'review' if sentiment else 'text'}\"`, which "
                f"truncates long {'reviews' if sentiment else 'texts'} exactly as in "
                f"training ({s.get('truncation')}, {max_len} tokens); the stock pipeline keeps only the first "
                f"{max_len} tokens."]
    else:
        out += ['fill = pipeline("fill-mask", model="path/to/this/folder")', 'fill("This movie was [MASK].")', "```", "",
                "or fine-tune it: `dapt finetune --model_name_or_path <this folder>`."]
    out += ["", "## Intended use", ""]
    if classifier and not sentiment:
        out += [f"* Assigning English text to one of the {len(classes)} classes above, text like the data it was "
                "trained on; research, teaching and as a baseline.",
                "* Not for decisions about people, content moderation or any high-stakes use without an "
                "evaluation on the target data."]
    elif classifier:
        out += ["* Binary sentiment (negative / positive) of English movie and TV reviews, like those it was "
                "trained on; research, teaching and as a baseline.",
                "* Not for decisions about people, content moderation or any high-stakes use without an "
                "evaluation on the target data."]
    else:
        out += ["* A starting point for fine-tuning on English review-domain tasks (sentiment, topic), or "
                "for masked-token prediction in that domain."]
    if classifier and not sentiment:
        scope = [f"* These {len(classes)} classes only: text that belongs to none (or several) is forced into "
                 "one, and the score is a softmax probability, not a calibrated confidence."]
    else:
        scope = ["* Two labels only: mixed or neutral reviews are forced into one of them, and the score is a "
                 "softmax probability, not a calibrated confidence."]
    out += ["", "## Limitations", "",
            ("* English only; trained on movie reviews. Other domains (product reviews, tweets, news), other "
             if sentiment else "* English only. Other domains, other ")
            + "languages, or text unlike the training data (domain shift) can lower accuracy substantially, "
            "and the scores above do not carry over to them.",
            f"* Inputs longer than {max_len} tokens are truncated"
            + (f" ({s.get('truncation')}: the middle of a long {'review' if sentiment else 'text'} is not read)"
               if classifier else "")
            + f"; {'sentiment' if sentiment else 'evidence'} that is only in the dropped part is missed.",
            *(scope + ["* Sarcasm, negation across long spans and rare words are known failure modes of models of "
                       "this kind."] if classifier else []),
            "* It inherits the biases of its base model's pretraining text and of the "
            + ("reviews" if sentiment else "texts") + " it was trained on.", ""]
    return "\n".join(out)
