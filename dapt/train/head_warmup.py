"""Head warm-up (--head_warmup_steps): the first optimizer steps train only the MLM head, then everything.

A checkpoint published without its MLM head (a sentence encoder, a distilled encoder) gets a head of
random weights; its large early gradients flow into the encoder and, through the decoder tied to the word
embeddings, into the embeddings. Warming the head up alone first keeps the pretrained weights out of that.

ZeRO flattens and partitions the optimizer's parameter groups once, at deepspeed.initialize, and counts
the gradient hooks it expects, so parameters cannot leave the optimizer or switch requires_grad mid-run.
Every parameter stays in; the freeze is done in three places:

* groups: the head's own parameters apart from the rest (engine.param_groups with `head=`), the rest
  marked FROZEN_KEY;
* gradients: while warming up, a hook on each frozen parameter hands autograd zeros instead of its
  gradient, before DeepSpeed reduces it: gradient clipping sees the head's norm only;
* the step: frozen groups step at lr 0 (no AdamW weight decay either: the weights stay bit-identical)
  on zero gradients (their Adam moments stay 0), and their step counters are put back, so at the switch
  they start as a fresh Adam (moments 0, step 0), as if they joined the optimizer there.

The phase follows the position (`set_position` before each step), so a run resumed inside the warm-up
continues it and one resumed after it trains everything. The backward still runs through the encoder
(a warm-up step costs what a full one does).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

FROZEN_KEY = "dapt_frozen_in_head_warmup"


class HeadWarmup:
    """Freezes `frozen` (all parameters but the head's) for the first `steps` optimizer steps."""

    def __init__(self, steps: int, frozen: Iterable[torch.nn.Parameter]):
        self.steps = steps
        self.active = False
        self._handles = [p.register_hook(self._zero_while_active) for p in frozen]

    def _zero_while_active(self, grad: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros_like(grad) if self.active else None  # None: the gradient as it is

    def set_position(self, step: int) -> None:
        """Before optimizer step `step + 1` (`step` steps done): steps 1..`steps` are the warm-up."""
        self.active = step < self.steps

    def done_at(self, step: int) -> bool:
        """Whether `step` (steps done) is the last warm-up step: the switch comes after it."""
        return self.steps > 0 and step == self.steps

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make `optimizer.step` leave the frozen groups as they are while warming up. DeepSpeed's ZeRO
        optimizers call it with the groups of the moment (ZeRO-2: one group at a time), whose dicts carry
        FROZEN_KEY; any AdamW keeps its step count in state["step"] (torch, DeepSpeed's fused and CPU Adam)."""
        step = optimizer.step

        def step_with_frozen_groups(*args: Any, **kwargs: Any) -> Any:
            frozen = [g for g in optimizer.param_groups if g.get(FROZEN_KEY)] if self.active else []
            if not frozen:
                return step(*args, **kwargs)
            lrs = [g["lr"] for g in frozen]
            counters = [(p, _copy(optimizer.state[p].get("step")) if p in optimizer.state else None)
                        for g in frozen for p in g["params"]]
            for g in frozen:
                g["lr"] = 0.0
            try:
                return step(*args, **kwargs)
            finally:
                for g, lr in zip(frozen, lrs):
                    g["lr"] = lr
                for p, before in counters:
                    _put_back(optimizer.state.get(p), before)

        optimizer.step = step_with_frozen_groups
        return optimizer


def _copy(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


def _put_back(state: dict[str, Any] | None, before: Any) -> None:
    """The step counter as it was before the step (0 where the step created it)."""
    if not state or "step" not in state:
        return
    if torch.is_tensor(state["step"]):
        state["step"].copy_(before if before is not None else torch.zeros_like(state["step"]))
    else:
        state["step"] = before if before is not None else 0
