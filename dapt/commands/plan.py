"""`dapt plan`: what a training job will do on a cluster shape (world size, batch, steps, tokens, memory
per GPU, checkpoints, time of the training steps), with no GPU and no hub; a shape the recipe cannot run
is one line and exit 2."""
from __future__ import annotations

import contextlib
import sys
from typing import Sequence

# DeepSpeed's logger writes to stdout, and on a login node without GPUs `import deepspeed` logs "Setting
# accelerator to CPU": created under this redirect, its handler writes to stderr, so stdout holds only the
# plan (`--json` output is piped into other tools).
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401

from dapt.commands import command  # noqa: E402
from dapt.jobs import plan  # noqa: E402


@command
def main(argv: Sequence[str] | None = None) -> list[plan.JobPlan]:
    request = plan.parse_plan_args(argv)
    plans = plan.make_plans(request)
    print(plan.to_json(plans) if request.json else plan.render_all(plans), flush=True)
    return plans
