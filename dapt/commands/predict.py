"""`dapt predict`: label and score for each text, from an exported classifier folder (see dapt/serve/predict.py).

    dapt predict --model runs/demo/finetune/model "Great film" "Awful film"
    cat reviews.txt | dapt predict --model runs/demo/finetune/model --format table
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any, Sequence, TextIO

from dapt.commands import command
from dapt.config import PRECISIONS, HelpFormatter, OneLineParser
from dapt.errors import DaptError
from dapt.io import atomic_write_text
from dapt.serve import predict


def logs_to_stderr() -> None:
    """stdout carries the predictions: DeepSpeed's logger (which writes to stdout) goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):  # first import: its handler binds to stderr
        from deepspeed.accelerator import get_accelerator
        from deepspeed.utils import logger

        get_accelerator()  # detection logs a line
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def build_parser(prog: str = "dapt predict") -> argparse.ArgumentParser:
    ap = OneLineParser(prog=prog, description=predict.__doc__, formatter_class=HelpFormatter)
    ap.add_argument("texts", nargs="*", help="texts to classify (default: --file or stdin)")
    ap.add_argument("--model", "--model_dir", dest="model", required=True,
                    help="an exported classifier folder (or a fine-tune stage's output dir)")
    ap.add_argument("--file", "-f", help="one text per line; - = stdin")
    ap.add_argument("--format", choices=("jsonl", "table"), default="jsonl",
                    help="jsonl: one JSON object per text; table: aligned columns for reading")
    ap.add_argument("--output", "-o", help="write here instead of stdout")
    ap.add_argument("--batch_size", type=int, default=32, help="texts per forward pass")
    ap.add_argument("--device", default=None, help="default: the accelerator DeepSpeed detects (cuda, cpu, ...)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto: bf16 (or fp16) autocast on GPUs that support it; fp32 on CPU whatever is asked")
    return ap


@command
def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise DaptError(f"batch_size must be >= 1, got {args.batch_size}")
    texts = predict.read_texts(args.texts, args.file, stdin or sys.stdin)
    predict.model_folder(args.model)  # bad input fails before any library logs a line
    logs_to_stderr()
    predictor = predict.Predictor(args.model, args.device, args.precision)
    preds = predictor.predict(texts, args.batch_size)
    text = (predict.format_table(preds) + "\n" if args.format == "table"
            else "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return preds
