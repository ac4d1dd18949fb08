#!/usr/bin/env python
"""Entry point: `deepspeed --num_gpus N launch/evaluate.py ...`, `torchrun`, `srun` or plain `python`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without install

from dapt.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
