"""Which examples each rank sees, and when.

Training order is a pure function of (seed, epoch, rank, world size), so a run can be resumed at any
batch and on another world size. Evaluation shards are disjoint and cover every example exactly once.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dapt.distributed import DistInfo
from dapt.errors import DaptError


def batch_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, first index): independent of worker count and order."""
    return int(np.random.SeedSequence([p % (2**32) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class IndexedRows(torch.utils.data.Dataset):
    """Lets a DataLoader fetch a whole micro-batch of a `datasets.Dataset` in one call."""

    def __init__(self, ds: Any, columns: Sequence[str]):
        self.ds = ds.select_columns(list(columns))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        rows = self.ds[indices]
        rows["_index"] = list(indices)
        return rows

    def __getitem__(self, index: int) -> dict[str, Any]:  # pragma: no cover - DataLoader uses __getitems__
        return self.__getitems__([index])


def steps_per_epoch(n_examples: int, effective_batch_size: int) -> int:
    steps = n_examples // effective_batch_size
    if steps == 0:
        raise DaptError(f"{n_examples} training examples are fewer than one effective batch "
                        f"({effective_batch_size}); lower effective_batch_size or add data")
    return steps


def train_batches(n_examples: int, epoch: int, seed: int, rank: int, world_size: int, micro: int,
                  effective: int, lengths: Sequence[int] | None = None,
                  bucket_steps: int = 50) -> list[list[int]]:
    """This rank's micro-batches (index lists) for one epoch.

    A seeded permutation per epoch; each global round of `world_size` micro-batches is dealt out
    rank by rank. The epoch uses steps * effective examples (< one effective batch is left out, a
    different random few each epoch), so every rank runs the same number of micro-batches.
    Optimizer step s always covers the same examples, whatever the world size (resume on another
    world size maps exactly).

    With `lengths` (length bucketing): chunks of `bucket_steps` effective batches are sorted by
    length, cut into steps, and the steps of a chunk shuffled; micro-batches then hold reviews of
    similar length (little padding) while the batch order stays random. Within a step, micro-step i
    takes the i-th sorted slice of world_size * micro examples and deals it round-robin to the ranks,
    so every rank gets the same length range: a rank with the longest reviews would make the others
    wait at each gradient all-reduce.
    """
    steps = steps_per_epoch(n_examples, effective)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(batch_seed(seed, epoch)))
    perm = perm[: steps * effective]
    if lengths is not None:
        gen = torch.Generator().manual_seed(batch_seed(seed, epoch, 1))
        order: list[int] = []
        for start in range(0, steps, bucket_steps):
            chunk = sorted(perm[start * effective:min(steps, start + bucket_steps) * effective].tolist(),
                           key=lambda i: lengths[i])
            groups = [chunk[k:k + effective] for k in range(0, len(chunk), effective)]
            for g in torch.randperm(len(groups), generator=gen).tolist():
                order.extend(groups[g])
        # [micro-step, example in the sorted slice] -> [micro-step, rank, example]
        dealt = torch.tensor(order, dtype=torch.long).view(-1, micro, world_size).transpose(1, 2)
        return dealt[:, rank, :].tolist()
    used = perm.view(-1, world_size, micro)
    return used[:, rank, :].tolist()


def eval_shard(n_examples: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s share of 0..n-1: strided, disjoint, together exactly all indices."""
    return list(range(rank, n_examples, world_size))


def eval_batches(indices: list[int], batch_size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Fixed-size batches of a shard, longest first when lengths are known (less padding)."""
    if lengths is not None:
        indices = sorted(indices, key=lambda i: -lengths[i])
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def num_eval_batches(n_examples: int, world_size: int, batch_size: int) -> int:
    """The most batches any rank gets: all ranks must run that many forward passes (ZeRO-3
    gathers weights collectively), ranks with fewer real batches run padding batches."""
    return math.ceil(math.ceil(n_examples / world_size) / batch_size)


def make_loader(rows: IndexedRows, batches: list[list[int]], collate: Any, num_workers: int,
                pin_memory: bool, generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    return iter(torch.utils.data.DataLoader(rows, batch_sampler=batches, collate_fn=collate,
                                            num_workers=num_workers, pin_memory=pin_memory, generator=generator))


def sharded_batches(n_examples: int, info: DistInfo, batch_size: int,
                    lengths: Sequence[int] | None = None) -> Iterator[tuple[list[int], bool]]:
    """(indices, real) for this rank; padding batches (real=False) reuse example 0 so that every rank
    makes the same number of forward passes, even a rank whose shard is empty (N < world size)."""
    mine = eval_batches(eval_shard(n_examples, info.rank, info.world_size), batch_size, lengths)
    for b in range(num_eval_batches(n_examples, info.world_size, batch_size)):
        yield (mine[b], True) if b < len(mine) else ([0], False)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
