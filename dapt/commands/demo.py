"""`dapt demo --model DIR`: the Gradio page of an exported classifier (dapt/serve/app.py)."""
from __future__ import annotations

from typing import Sequence

from dapt.commands import command
from dapt.config import HelpFormatter, OneLineParser
from dapt.serve import app


@command
def main(argv: Sequence[str] | None = None) -> None:
    ap = OneLineParser(prog="dapt demo", description=app.__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", "--model_dir", dest="model", required=True, help="an exported classifier folder")
    ap.add_argument("--host", default="127.0.0.1", help="the address the page listens on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=7860, help="the port the page listens on")
    ap.add_argument("--device", default=None, help="torch device (default: the accelerator DeepSpeed detects)")
    args = ap.parse_args(argv)
    app.build_demo(args.model, args.device).launch(server_name=args.host, server_port=args.port, share=False)
