"""`dapt report RUN_DIR`: PNG plots and a Markdown summary of a stage, an evaluation or a pipeline."""
from __future__ import annotations

from typing import Any, Sequence

from dapt.commands import command
from dapt.config import HelpFormatter, OneLineParser
from dapt.jobs import report


@command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = OneLineParser(prog="dapt report", description=report.__doc__,
                       formatter_class=HelpFormatter)
    ap.add_argument("run_dir", help="a stage's, an evaluation's or a pipeline's output dir")
    ap.add_argument("--output_dir", help="where the plots and report.md go (default: RUN_DIR/report)")
    args = ap.parse_args(argv)
    made = report.make_report(args.run_dir, args.output_dir)
    print(f"report written to {made['output_dir']}:")
    for p in [*made["pngs"], made["markdown"]]:
        print(f"  {p}")
    return made
