"""How the recipe's effective batch is cut for a world size: micro batch per rank and accumulation.

The effective batch is the recipe's contract (it decides the result); the micro batch is only a memory
budget. So a world size whose ranks would together take more than the effective batch in one
micro-step shrinks the micro batch to what fits (accumulation 1), and a micro batch that does not
divide a rank's share shrinks to the largest one that does: never above what was asked, so memory
stays within the budget. A world size that cannot divide the effective batch at all is refused,
naming the world sizes that can.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dapt.errors import DaptError


@dataclass(frozen=True)
class BatchPlan:
    effective: int  # examples per optimizer step, over all ranks (the recipe's)
    world_size: int
    micro: int  # examples per rank per forward/backward
    accumulation: int  # micro-batches per rank per optimizer step
    requested_micro: int  # the recipe's micro_batch_size (a memory budget)

    @property
    def shrunk(self) -> bool:
        return self.micro != self.requested_micro

    def note(self) -> str:
        """One line saying why the micro batch differs from the request ("" when it does not)."""
        if not self.shrunk:
            return ""
        share = self.effective // self.world_size
        why = ("exceeds" if self.requested_micro > share else "does not divide")
        return (f"micro_batch_size {self.requested_micro} -> {self.micro}: {self.requested_micro} {why} each rank's "
                f"share of the effective batch ({self.effective} / {self.world_size} ranks = {share}); "
                f"accumulation {self.accumulation}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(effective: int, micro: int, world_size: int) -> BatchPlan:
    """The micro batch and accumulation for `world_size` ranks, or a DaptError naming the world sizes
    that can run `effective`."""
    if effective < 1 or micro < 1 or world_size < 1:
        raise DaptError(f"batch sizes and world size must be >= 1 (effective {effective}, micro {micro}, "
                        f"world {world_size})")
    if effective % world_size:
        raise DaptError(f"effective_batch_size {effective} cannot be split over {world_size} ranks: world sizes "
                        f"that can run it are {', '.join(map(str, divisors(effective)))} (or change "
                        f"effective_batch_size, which changes the recipe)")
    share = effective // world_size
    fits = max(d for d in divisors(share) if d <= micro)
    return BatchPlan(effective=effective, world_size=world_size, micro=fits, accumulation=share // fits,
                     requested_micro=micro)
