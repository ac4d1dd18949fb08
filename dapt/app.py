"""`dapt demo --model DIR`: a Gradio page, a text box -> label and confidence, from an exported classifier.

Optional extra: `pip install -e '.[demo]'`. The model runs through `dapt.predict.Predictor`, so long
reviews are truncated as in training. `--share` is off: the page is served on this machine only
(`--host 0.0.0.0` to reach it from others).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from dapt.errors import DaptError, cli_entry

EXAMPLES = [
    "A wonderful film: the acting is superb and the story kept me hooked until the very end.",
    "Dull and predictable. The dialogue is terrible and I want those two hours back.",
]


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


def build_demo(model_dir: str, device: str | None = None) -> Any:
    from dapt.predict import Predictor

    gr = _gradio()
    predictor = Predictor(model_dir, device)
    s = predictor.settings
    return gr.Interface(
        fn=classify_fn(predictor),
        inputs=gr.Textbox(lines=6, label="Movie review (English)", placeholder="Type or paste a review..."),
        outputs=gr.Label(num_top_classes=len(predictor.id2label), label="Sentiment"),
        examples=EXAMPLES,
        title="dapt sentiment demo",
        description=(f"Model: {predictor.model_dir}. Reviews longer than {s['max_seq_length']} tokens are truncated "
                     f"({s['truncation']}), as in training."),
        flagging_mode="never",
        api_name="predict",
    )


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    from dapt.config import _OneLineParser

    ap = _OneLineParser(prog="dapt demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--model_dir", dest="model", required=True, help="an exported classifier folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    build_demo(args.model, args.device).launch(server_name=args.host, server_port=args.port, share=False)
