#!/usr/bin/env python
"""Entry point: `python launch/pipeline.py --demo` (it starts each stage under the deepspeed launcher)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without install

from dapt.commands import import_without_gc  # noqa: E402

import_without_gc()  # before the command imports torch, DeepSpeed and transformers
from dapt.commands.pipeline import main  # noqa: E402

if __name__ == "__main__":
    main()
