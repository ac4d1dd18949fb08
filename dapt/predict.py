"""`dapt predict`: label and score for each text, from an exported classifier folder.

Texts come from arguments, a file (one per line; `-` = stdin) or stdin. Long texts are cut exactly
as in training (the `dapt` entry of the folder's config.json: max_seq_length, truncation, head_tokens;
`clean_text` + `truncate_ids`), so a prediction sees what the model was trained on. Batches are
sorted by length (little padding); the device is the accelerator DeepSpeed detects.

    dapt predict --model runs/demo/finetune/model "Great film" "Awful film"
    cat reviews.txt | dapt predict --model runs/demo/finetune/model --format table
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import torch

from dapt.errors import DaptError, cli_entry, first_line


def truncation_settings(tokenizer: Any, config: Any) -> dict[str, Any]:
    """As trained (config.json `dapt`), else the model's own limit with head truncation."""
    trained = dict(getattr(config, "dapt", None) or {})
    limit = min(v for v in (getattr(config, "max_position_embeddings", None) or 512,
                            getattr(tokenizer, "model_max_length", None) or 512, 10**6) if v)
    max_len = int(trained.get("max_seq_length") or min(512, limit))
    return {"max_seq_length": max_len, "truncation": trained.get("truncation") or "head",
            "head_tokens": int(trained.get("head_tokens") or 0)}


def model_folder(model_dir: str | Path) -> Path:
    """An exported model folder, or a stage's output dir (its `model/`); anything else is an error."""
    path = Path(model_dir).expanduser()
    if (path / "model" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "model"
    if not path.is_dir():
        raise DaptError(f"model folder not found: {model_dir}")
    if not (path / "config.json").is_file():
        raise DaptError(f"{model_dir} is not a model folder (no config.json)")
    return path


class Predictor:
    """An exported classifier on the local accelerator (or `device`), with training's truncation."""

    def __init__(self, model_dir: str | Path, device: str | None = None, precision: str = "auto"):
        from dapt.evaluation import inference_precision
        from dapt.models import load_tokenizer

        path = model_folder(model_dir)
        from transformers import AutoModelForSequenceClassification

        from dapt.models import quiet_transformers

        quiet_transformers()
        self.tokenizer = load_tokenizer(str(path))
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise DaptError(f"cannot load a classifier from {model_dir}: {first_line(exc)}") from None
        if device is None:
            from deepspeed.accelerator import get_accelerator

            device = get_accelerator().current_device_name()
        self.device = torch.device(device)
        self.precision = inference_precision(precision) if self.device.type != "cpu" else "fp32"
        self.model = model.to(self.device).eval()
        self.settings = truncation_settings(self.tokenizer, model.config)
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.model_dir = path

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        from dapt.data import encode_for_classification

        s = self.settings
        return encode_for_classification(self.tokenizer, texts, s["max_seq_length"], s["truncation"],
                                         s["head_tokens"])[0]

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Softmax probabilities [len(texts), num_labels], in input order."""
        from dapt.data import PadCollator
        from dapt.evaluation import autocast_for, to_device

        ids = self.encode(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        collate = PadCollator(self.tokenizer.pad_token_id)
        out = torch.empty(len(ids), len(self.id2label))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = to_device(collate({"input_ids": [ids[i] for i in idx]}), self.device)
            with autocast_for(self.precision, self.device):
                logits = self.model(**batch).logits.float()
            out[idx] = torch.softmax(logits, dim=-1).cpu()
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
        probs = self.probabilities(texts, batch_size)
        scores, labels = probs.max(dim=-1)
        return [{"text": t, "label": self.id2label[int(k)], "score": float(p)}
                for t, k, p in zip(texts, labels.tolist(), scores.tolist())]


def read_texts(texts: Sequence[str], file: str | None, stdin: TextIO) -> list[str]:
    """Arguments, else the file's lines (`-`: stdin), else stdin when it is not a terminal. Blank
    lines are skipped; nothing left is an error."""
    if texts and file:
        raise DaptError("pass texts as arguments or --file, not both")
    if texts:
        lines: Iterable[str] = texts
    elif file and file != "-":
        p = Path(file).expanduser()
        if not p.is_file():
            raise DaptError(f"input file not found: {file}")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DaptError(f"{file} is not UTF-8 text (byte {exc.start})") from None
    elif file == "-" or not stdin.isatty():
        lines = stdin.read().splitlines()
    else:
        raise DaptError("no input: pass texts as arguments, --file FILE, or pipe them on stdin")
    out = [t for t in (str(x).strip() for x in lines) if t]
    if not out:
        raise DaptError("no input text (empty input, or only blank lines)")
    return out


def format_table(preds: Sequence[dict[str, Any]], width: int = 80) -> str:
    label_w = max(5, *(len(p["label"]) for p in preds))
    lines = [f"{'label':<{label_w}}  {'score':>6}  text"]
    for p in preds:
        text = " ".join(p["text"].split())
        text = text if len(text) <= width else text[:width - 3] + "..."
        lines.append(f"{p['label']:<{label_w}}  {p['score']:>6.3f}  {text}")
    return "\n".join(lines)


def logs_to_stderr() -> None:
    """stdout carries the predictions: DeepSpeed's logger (which writes to stdout) goes to stderr."""
    import contextlib
    import logging

    with contextlib.redirect_stdout(sys.stderr):  # first import: its handler binds to stderr
        from deepspeed.accelerator import get_accelerator
        from deepspeed.utils import logger

        get_accelerator()  # detection logs a line
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def build_parser(prog: str = "dapt predict") -> argparse.ArgumentParser:
    from dapt.config import _OneLineParser

    ap = _OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("texts", nargs="*", help="texts to classify (default: --file or stdin)")
    ap.add_argument("--model", "--model_dir", dest="model", required=True,
                    help="an exported classifier folder (or a fine-tune stage's output dir)")
    ap.add_argument("--file", "-f", help="one text per line; - = stdin")
    ap.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    ap.add_argument("--output", "-o", help="write here instead of stdout")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--device", default=None, help="default: the accelerator DeepSpeed detects (cuda, cpu, ...)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    return ap


@cli_entry
def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise DaptError(f"batch_size must be >= 1, got {args.batch_size}")
    texts = read_texts(args.texts, args.file, stdin or sys.stdin)
    model_folder(args.model)  # bad input fails before any library logs a line
    logs_to_stderr()
    predictor = Predictor(args.model, args.device, args.precision)
    preds = predictor.predict(texts, args.batch_size)
    text = (format_table(preds) + "\n" if args.format == "table"
            else "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return preds
