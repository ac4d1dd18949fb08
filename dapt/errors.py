"""The exceptions dapt raises on purpose, and the exit codes the commands map them to.

Library code raises; only the commands (dapt/commands/) turn these into messages and exit codes.
"""
from __future__ import annotations

EXIT_USAGE = 2  # bad input: configuration, data, paths
# A run that saved a checkpoint because it was told to stop (SIGUSR1/SIGTERM): "requeue me" for the
# launch scripts (75 = EX_TEMPFAIL, "try again later").
EXIT_REQUEUE = 75
EXIT_TRAINING_FAILED = 3  # training cannot go on (e.g. the FP16 loss scale hit its floor); not a requeue


class DaptError(Exception):
    """An error caused by the user's input; its message is shown as one line."""


class StopRequested(Exception):
    """Training was told to stop (a signal) and saved a checkpoint; the command exits EXIT_REQUEUE."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step = signum, step


class TrainingFailed(Exception):
    """Training cannot continue from here (not the user's input, not a requeue); one line, exit 3.

    `on_every_rank`: every rank raises it at the same step (a collective decision, e.g. DeepSpeed's
    all-reduced overflow check), so the ranks may wait for each other before exiting."""

    def __init__(self, message: str, on_every_rank: bool = False):
        super().__init__(message)
        self.on_every_rank = on_every_rank


def first_line(exc: BaseException) -> str:
    """A third-party exception's message cut to its first line (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
