"""`dapt predict`: label and score for each text, from an exported classifier folder.

Texts come from arguments, a file (one per line; `-` = stdin) or stdin. Long texts are cut exactly
as in training (the `dapt` entry of the folder's config.json: max_seq_length, truncation, head_tokens;
`clean_text` + `truncate_ids`; a model without them: the package defaults, dapt/model/settings.py), so a prediction sees what the model was trained on. Batches are
sorted by length (little padding); the device is the accelerator DeepSpeed detects.

    dapt predict --model runs/demo/finetune/model "Great film" "Awful film"
    cat reviews.txt | dapt predict --model runs/demo/finetune/model --format table
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import torch

from dapt.data.batching import to_device
from dapt.data.classify import PadCollator
from dapt.data.text import encode_for_classification
from dapt.errors import DaptError, first_line
from dapt.eval.scoring import autocast_for, inference_precision
from dapt.model.loading import load_tokenizer, quiet_transformers
from dapt.model.settings import as_trained


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
        from transformers import AutoModelForSequenceClassification

        path = model_folder(model_dir)
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
        self.settings = as_trained(path)  # the same resolver as the evaluation job
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.model_dir = path

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        s = self.settings
        return encode_for_classification(self.tokenizer, texts, s.max_seq_length, s.truncation, s.head_tokens)[0]

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Softmax probabilities [len(texts), num_labels], in input order."""
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
