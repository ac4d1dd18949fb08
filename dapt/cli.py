"""`dapt <command> ...`: one entry point for every step (installed as the `dapt` console script).

    dapt mlm|finetune|evaluate|export|prepare ...   the stages (as launch/*.py; one rank, or under a
                                                    launcher: `deepspeed --num_gpus 8 $(which dapt) mlm ...`)
    dapt pipeline --demo --output_dir runs/demo     MLM -> fine-tune -> evaluate -> export, locally
    dapt report RUN_DIR                             PNG plots + Markdown summary of a run
    dapt summarize DIR                              seeds x settings: mean, std and 95% CI per setting
    python -m dapt <command> ...                    the same, without the console script
    dapt predict --model DIR "text" ...             label and score per text
    dapt demo --model DIR                           the Gradio demo (pip install -e '.[demo]')
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from dapt.commands import import_without_gc
from dapt.version import __version__

# command -> help; each is dapt/commands/<command>.py with a main(argv)
COMMANDS = {
    "prepare": "tokenise and pack data once, offline",
    "mlm": "stage 1: masked-language-model pretraining",
    "finetune": "stage 2: sentiment fine-tuning",
    "evaluate": "exact distributed evaluation",
    "export": "checkpoint -> Hugging Face model folder",
    "pipeline": "the whole pipeline on this machine",
    "plan": "what a job will do on a cluster shape (steps, memory, disk, time), before it queues",
    "report": "plots and a Markdown summary of a run",
    "summarize": "mean, std and 95% intervals over a sweep's runs (seeds x settings)",
    "predict": "classify texts with an exported model",
    "demo": "Gradio demo of an exported model",
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    return ("usage: dapt <command> [args...]   (dapt <command> --help for its options)\n\ncommands:\n"
            + "\n".join(f"  {c:<{width}}  {h}" for c, h in COMMANDS.items()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Returns 0: the console script exits with main()'s value, so a command's own
    return value (results, paths) must not reach it."""
    args = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N right after the script (before the command): move it
    # to the command's arguments, where the stages accept (and ignore) it.
    launcher_args = [a for a in args[:1] if a.startswith(("--local_rank", "--local-rank"))]
    args = args[len(launcher_args):] + launcher_args
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"dapt {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"dapt: error: unknown command '{command}'\n{usage()}", file=sys.stderr)
        sys.exit(2)
    import_without_gc()
    importlib.import_module(f"dapt.commands.{command}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
