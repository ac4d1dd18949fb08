"""`dapt summarize DIR`: mean, std and 95% intervals over the runs of a sweep (seeds x settings)."""
from __future__ import annotations

from typing import Any, Sequence

from dapt.commands import command
from dapt.config import HelpFormatter, OneLineParser
from dapt.jobs import sweep


@command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = OneLineParser(prog="dapt summarize", description=sweep.__doc__,
                       formatter_class=HelpFormatter)
    ap.add_argument("sweep_dir", help="a directory holding runs at any depth (a sweep's, or any)")
    ap.add_argument("--output_dir", help="where the summary goes (default: SWEEP_DIR)")
    args = ap.parse_args(argv)
    summary = sweep.summarize(args.sweep_dir, args.output_dir)
    level = f"{summary['confidence']:.0%}"
    print(f"{len(summary['runs'])} runs in {len(summary['settings'])} setting(s); mean and {level} interval of the "
          f"mean over n seeds ({summary['interval']['method']}, inside [0, 1]):")
    for line in sweep.setting_lines(summary):
        print(f"  {line}")
    print("summary written:")
    for key in ("results", "markdown", "plot"):
        print(f"  {summary['files'][key]}")
    return summary
