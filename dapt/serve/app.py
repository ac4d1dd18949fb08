"""`dapt demo --model DIR`: a Gradio page, a text box -> label and confidence, from an exported classifier,
with the model's measured results (per test set, with 95% intervals) beside them.

Optional extra: `pip install -e '.[demo]'`. The model runs through `dapt.serve.predict.Predictor`, so long
reviews are truncated as in training. The measured results are the ones its card shows (`results/<set>.json`
in the model folder, written by the evaluation job); a model never evaluated says so. `--share` is off: the
page is served on this machine only (`--host 0.0.0.0` to reach it from others).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from dapt.data.labels import is_default_binary
from dapt.errors import DaptError
from dapt.model.card import measured_results
from dapt.serve.predict import Predictor

EXAMPLES = [
    "A wonderful film: the acting is superb and the story kept me hooked until the very end.",
    "Dull and predictable. The dialogue is terrible and I want those two hours back.",
]
# stable element ids (tests/test_demo_browser.py drives the page by them)
ELEM_IDS = {"review": "review", "submit": "submit", "label": "label", "results": "measured-results"}
# The page's wording: the IMDB sentiment classifier, or any other set of classes (their names shown)
WORDS = {"sentiment": {"title": "dapt sentiment demo", "texts": "Reviews", "box": "Movie review (English)",
                       "placeholder": "Type or paste a review...", "label": "Sentiment"},
         "classes": {"title": "dapt text classification demo", "texts": "Texts", "box": "Text (English)",
                     "placeholder": "Type or paste a text...", "label": "Class"}}
NOT_EVALUATED = ("Not evaluated yet: `dapt evaluate --model_name_or_path DIR ...` adds each test set's results "
                 "here (`results/<set>.json` in the model folder).")


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a cluster node
    try:
        import gradio as gr
    except ImportError:
        raise DaptError("the demo needs gradio: pip install -e '.[demo]' (or pip install gradio)") from None
    return gr


def classify_fn(predictor: Any) -> Any:
    """text -> {label: probability} (what gr.Label shows); empty text -> {}."""

    def classify(text: str) -> dict[str, float]:
        if not text or not text.strip():
            return {}
        probs = predictor.probabilities([text])[0].tolist()
        return {predictor.id2label[i]: float(p) for i, p in enumerate(probs)}

    return classify


def _with_ci(r: Mapping[str, Any], key: str) -> str:
    value = r.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    ci = r.get(f"{key}_ci")
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci and len(ci) == 2 else f"{value:.4f}"


def _cell(v: Any) -> str:
    return "-" if v is None or v == "" else str(v).replace("|", "\\|")


def results_markdown(results: Sequence[Mapping[str, Any]], per_class: bool = False) -> str:
    """The "Measured results" panel: one row per test set (`dapt.model.card.measured_results`); with
    `per_class` (more than the two sentiment classes) each set's F1 per class too."""
    if not results:
        return NOT_EVALUATED
    lines = ["| set | split | examples | accuracy [95% CI] | macro-F1 [95% CI] |", "|---|---|---:|---|---|"]
    lines += [f"| {_cell(r.get('set'))} | {_cell(r.get('split'))} | {_cell(r.get('n_examples'))} "
              f"| {_with_ci(r, 'accuracy')} | {_with_ci(r, 'f1_macro')} |" for r in results]
    if per_class:
        lines += ["", "F1 per class:"]
        lines += [f"* {_cell(r.get('set'))}: " + ", ".join(f"{_cell(k)} {v.get('f1', 0):.4f}"
                                                           for k, v in (r.get("per_class") or {}).items())
                  for r in results]
    lines += ["", ("Each example evaluated once; 95% intervals: Wilson for accuracy, bootstrap for macro-F1 "
                   "(the numbers of the model card, `results/<set>.json` in the model folder).")]
    return "\n".join(lines)


def build_demo(model_dir: str, device: str | None = None) -> Any:
    gr = _gradio()
    predictor = Predictor(model_dir, device)
    s = predictor.settings
    names = [predictor.id2label[i] for i in sorted(predictor.id2label)]
    words = WORDS["sentiment" if is_default_binary(names) else "classes"]
    panel = results_markdown(measured_results(predictor.model_dir), per_class=not is_default_binary(names))
    with gr.Blocks(title=words["title"], analytics_enabled=False) as demo:
        gr.Markdown(f"# {words['title']}\n\n"
                    f"Model: `{predictor.model_dir}`. {words['texts']} longer than {s.max_seq_length} tokens are "
                    f"truncated ({s.truncation}), as in training."
                    + ("" if is_default_binary(names) else f"\n\nClasses: {', '.join(f'`{n}`' for n in names)}."))
        with gr.Row():
            with gr.Column(scale=1):
                review = gr.Textbox(lines=6, label=words["box"], placeholder=words["placeholder"],
                                    elem_id=ELEM_IDS["review"])
                submit = gr.Button("Submit", variant="primary", elem_id=ELEM_IDS["submit"])
                if is_default_binary(names):  # movie reviews: examples only for the sentiment model
                    gr.Examples(examples=EXAMPLES, inputs=review)
            with gr.Column(scale=1):
                label = gr.Label(num_top_classes=len(names), label=words["label"], elem_id=ELEM_IDS["label"])
                gr.Markdown("### Measured results")
                gr.Markdown(panel, elem_id=ELEM_IDS["results"])
        submit.click(classify_fn(predictor), inputs=review, outputs=label, api_name="predict")
    return demo
