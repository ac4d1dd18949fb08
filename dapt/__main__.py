"""`python -m dapt <command> ...`: the same as the `dapt` console script."""
import sys

from dapt.cli import main

sys.exit(main())
