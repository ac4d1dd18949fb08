#!/usr/bin/env python
"""Entry point: `deepspeed --num_gpus N launch/evaluate.py ...`, `torchrun`, `srun` or plain `python`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without install

from dapt.commands import import_without_gc  # noqa: E402

import_without_gc()  # before the command imports torch, DeepSpeed and transformers
from dapt.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
