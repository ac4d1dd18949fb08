"""`dapt <command> ...`: one entry point for every step (installed as the `dapt` console script).

    dapt mlm|finetune|evaluate|export|prepare ...   the stages (as launch/*.py; one rank, or under a
                                                    launcher: `deepspeed --num_gpus 8 $(which dapt) mlm ...`)
    dapt pipeline --demo --output_dir runs/demo     MLM -> fine-tune -> evaluate -> export, locally
    dapt report RUN_DIR                             PNG plots + Markdown summary of a run
    dapt predict --model DIR "text" ...             label and score per text
    dapt demo --model DIR                           the Gradio demo (pip install -e '.[demo]')
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Sequence

from dapt.version import __version__

COMMANDS = {
    "mlm": ("dapt.mlm", "stage 1: masked-language-model pretraining"),
    "finetune": ("dapt.finetune", "stage 2: sentiment fine-tuning"),
    "evaluate": ("dapt.evaluation", "exact distributed evaluation"),
    "export": ("dapt.export", "checkpoint -> Hugging Face model folder"),
    "prepare": ("dapt.prepare", "tokenise and pack data once, offline"),
    "pipeline": ("dapt.pipeline", "the whole pipeline on this machine"),
    "report": ("dapt.report", "plots and a Markdown summary of a run"),
    "predict": ("dapt.predict", "classify texts with an exported model"),
    "demo": ("dapt.app", "Gradio demo of an exported model"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    return ("usage: dapt <command> [args...]   (dapt <command> --help for its options)\n\ncommands:\n"
            + "\n".join(f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items()))


def main(argv: Sequence[str] | None = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N right after the script (before the command): move it
    # to the command's arguments, where the stages accept (and ignore) it.
    launcher_args = [a for a in args[:1] if a.startswith(("--local_rank", "--local-rank"))]
    args = args[len(launcher_args):] + launcher_args
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    if args[0] in ("-V", "--version"):
        print(f"dapt {__version__}")
        return None
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"dapt: error: unknown command '{command}'\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    main()
