"""Process group, device and rank helpers.

The accelerator DeepSpeed detects decides everything hardware-specific: device (cuda:N, cpu, ...),
communication backend (NCCL on GPUs, gloo on CPU) and which precisions exist. Ranks come from the
launcher's environment (deepspeed, torchrun, srun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), from MPI
(DeepSpeed's mpi4py discovery), or default to a single process.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """A plain `python launch/x.py` is a world of one; give torch.distributed what it needs."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _cpu_threads(local_world_size: int) -> None:
    # Ranks on one CPU host share its cores; oversubscribing them makes every rank several times slower.
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_world_size)))


def setup_distributed(timeout_minutes: float | None = None) -> DistInfo:
    """Initialise the process group on the detected accelerator's backend."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizer threads fight torch for cores
    _single_process_env()
    acc = get_accelerator()
    backend = acc.communication_backend_name()
    minutes = timeout_minutes or float(os.environ.get("DAPT_DIST_TIMEOUT_MINUTES", "30"))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                                   timeout=timedelta(minutes=minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() == "cpu":
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
        _cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world))
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def comm_device(info: DistInfo) -> torch.device:
    """Where tensors for collectives live: gloo works on host memory, NCCL and others on the device."""
    return torch.device("cpu") if info.backend == "gloo" else info.device


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all ranks (returns a new tensor on the tensor's original device)."""
    if info.world_size == 1:
        return tensor.clone()
    t = tensor.to(comm_device(info)).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size == 1:
        return tensor.clone()
    t = tensor.to(comm_device(info)).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(tensor.device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. datasets.map writes its cache); the others then reuse it."""
    if not info.is_main:
        barrier()
    try:
        yield
    finally:
        if info.is_main:
            barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
