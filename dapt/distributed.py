"""Process group, device and rank helpers.

The accelerator DeepSpeed detects decides everything hardware-specific: device (cuda:N, cpu, ...),
communication backend (NCCL on GPUs, gloo on CPU) and which precisions exist. Ranks come from the
launcher's environment (deepspeed, torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), from an `srun` task
(slurm/launch.sh, a bare `srun`, `srun --mpi=pmix`: SLURM_PROCID/SLURM_STEP_*, PMIX_RANK), from
OpenMPI's `mpirun` (OMPI_COMM_WORLD_*; rank 0's address and port broadcast with mpi4py), from other
MPI launchers (DeepSpeed's mpi4py discovery), or default to a single process. This module is the only
place that derives ranks and the rendezvous address: the Slurm scripts only start the tasks.
DAPT_MASTER_ADDR / DAPT_MASTER_PORT override the address and port dapt would pick under srun and
mpirun (MASTER_ADDR / MASTER_PORT, when set, are the launcher's and win).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from dapt.errors import DaptError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    # Whether this setup created the process group (and so tears it down): a caller that set one up
    # itself (a notebook, a test session) keeps it across runs.
    owns_group: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _single_process_env() -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from whatever started this process and
    return its name. A plain `python launch/x.py` (also inside an sbatch script, whose batch shell sees
    SLURM_PROCID=0 and SLURM_NTASKS of the whole job but is no step task) is a world of one."""
    env = os.environ
    if "RANK" in env:  # deepspeed, torchrun, or set by hand
        return "env"
    if "OMPI_COMM_WORLD_RANK" in env:  # OpenMPI's mpirun
        _mpirun_env()
        return "mpirun"
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):  # a task of `srun`
        _srun_env()
        return "srun"
    if "PMI_RANK" in env or "PMIX_RANK" in env:  # another MPI launcher: DeepSpeed's mpi4py discovery
        return "mpi"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return "single"


def launcher_world_size() -> int | None:
    """The world size the launcher's environment announces, read before any process group exists (so a
    world size the recipe cannot run fails before data, model or rendezvous). Mirrors
    `_single_process_env`; None where only the MPI library knows (another MPI launcher without PMI_SIZE)."""
    env = os.environ
    if dist.is_available() and dist.is_initialized():  # a caller's own process group
        return dist.get_world_size()
    try:
        if "RANK" in env:
            return int(env.get("WORLD_SIZE", "1"))
        if "OMPI_COMM_WORLD_RANK" in env:
            return int(env["OMPI_COMM_WORLD_SIZE"])
        if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
            return int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        if "PMI_RANK" in env or "PMIX_RANK" in env:
            return int(env["PMI_SIZE"]) if "PMI_SIZE" in env else None
    except (KeyError, ValueError) as e:
        raise DaptError(f"the launcher's environment gives no usable world size ({e}); "
                        "check WORLD_SIZE / SLURM_NTASKS / OMPI_COMM_WORLD_SIZE") from None
    return 1


def _dapt_master_addr() -> str | None:
    """DAPT_MASTER_ADDR, when set and not empty."""
    return os.environ.get("DAPT_MASTER_ADDR", "").strip() or None


def _dapt_master_port() -> str | None:
    """DAPT_MASTER_PORT, when set and not empty: a port number 1..65535 (else a DaptError)."""
    value = os.environ.get("DAPT_MASTER_PORT", "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise DaptError(f"DAPT_MASTER_PORT={os.environ['DAPT_MASTER_PORT']}: expected a port number (1-65535)")
    return str(int(value))


def _mpirun_env() -> None:
    """OpenMPI's mpirun: ranks from OMPI_COMM_WORLD_*, rank 0's address and a free port of rank 0's host
    broadcast to all with mpi4py (unless MASTER_ADDR/MASTER_PORT are set). One host: 127.0.0.1; several:
    the first address of `hostname -I` on rank 0's host (DAPT_MASTER_ADDR / DAPT_MASTER_PORT override them)."""
    env = os.environ
    size, local_size = int(env["OMPI_COMM_WORLD_SIZE"]), int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "0"))
    env.update(RANK=env["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=str(size),
               LOCAL_RANK=env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    if local_size:  # RANK was not set: a LOCAL_WORLD_SIZE here is another launcher's, stale
        env["LOCAL_WORLD_SIZE"] = str(local_size)
    if "MASTER_ADDR" not in env and (addr := _dapt_master_addr()):
        env["MASTER_ADDR"] = addr
    if "MASTER_PORT" not in env and (port := _dapt_master_port()):
        env["MASTER_PORT"] = port
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return
    try:
        from mpi4py import MPI
    except ImportError as e:  # also a RuntimeError when mpi4py finds no MPI library
        raise DaptError("under mpirun, dapt needs mpi4py to agree on a rendezvous address "
                        "(pip install 'dapt[mpi]'), or set MASTER_ADDR and MASTER_PORT") from e
    except RuntimeError as e:
        raise DaptError(f"mpi4py cannot load the MPI library: {e}") from e
    comm = MPI.COMM_WORLD
    ours = None
    if comm.Get_rank() == 0:
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_size == size else _host_address())
        ours = (addr, env.get("MASTER_PORT") or str(free_port(addr)))
    addr, port = comm.bcast(ours, root=0)
    env.update(MASTER_ADDR=addr, MASTER_PORT=port)


def _host_address() -> str:
    """An address of this host that other hosts can reach (what DeepSpeed's MPI discovery uses)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(socket.gethostname())


def _tasks_on_node(spec: str, node: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE ("2(x3),1") -> the number of tasks on node index `node`."""
    counts: list[int] = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[node] if node < len(counts) else 1


def _slurm_first_host(nodelist: str) -> str:
    """First host of a Slurm node list, as an address: its name when it resolves, else its NodeAddr
    (nodes that are only names to Slurm, e.g. several slurmd on one test machine)."""
    def scontrol(*args: str) -> str:
        try:
            return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise DaptError(f"srun task: cannot run scontrol to find the master host ({e}); "
                            "set MASTER_ADDR and MASTER_PORT, or launch with slurm/launch.sh") from e

    hosts = scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise DaptError(f"srun task: `scontrol show hostnames {nodelist}` returned nothing; set MASTER_ADDR")
    host = hosts[0]
    with contextlib.suppress(OSError):
        socket.getaddrinfo(host, None)
        return host
    for word in scontrol("show", "node", host).split():
        if word.startswith("NodeAddr="):
            return word.split("=", 1)[1]
    raise DaptError(f"srun task: master host {host} does not resolve and has no NodeAddr; set MASTER_ADDR")


def _srun_env() -> None:
    """A task started by `srun` (slurm/launch.sh, a bare srun, or `--mpi=pmix`: PMIX_RANK equals
    SLURM_PROCID): RANK, WORLD_SIZE and LOCAL_RANK from the step's SLURM_PROCID/SLURM_STEP_NUM_TASKS/
    SLURM_LOCALID, LOCAL_WORLD_SIZE = this node's count in SLURM_STEP_TASKS_PER_NODE (nodes may differ);
    the master is the step's first node (its NodeAddr when the name does not resolve), the port derived
    from the job and step ids (the same on every node, another for each step). MASTER_ADDR/MASTER_PORT,
    when set, win; then DAPT_MASTER_ADDR/DAPT_MASTER_PORT."""
    env = os.environ
    rank = env["SLURM_PROCID"]
    if "PMIX_RANK" in env and env["PMIX_RANK"] != rank:
        raise DaptError(f"srun task: PMIX_RANK={env['PMIX_RANK']} but SLURM_PROCID={rank}")
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0"))
    env.update(RANK=rank, WORLD_SIZE=env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"],
               LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    # RANK was not set: a LOCAL_WORLD_SIZE here is inherited from elsewhere, stale
    spec = env.get("SLURM_STEP_TASKS_PER_NODE")
    if spec:
        env["LOCAL_WORLD_SIZE"] = str(_tasks_on_node(spec, int(env.get("SLURM_NODEID", "0"))))
    else:
        env.pop("LOCAL_WORLD_SIZE", None)
    one_task = env["WORLD_SIZE"] == "1"  # nothing to agree on: no scontrol, a free port as for plain python
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        env["MASTER_ADDR"] = _dapt_master_addr() or (
            _slurm_first_host(nodelist) if nodelist and not one_task else "127.0.0.1")
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        step_id = int(step) if step.isdigit() else 0
        env["MASTER_PORT"] = _dapt_master_port() or (
            str(free_port()) if one_task else str(20000 + (job * 7 + step_id + 1) % 20000))


def _release_cpu_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank> (tens of MB per rank) and never unlinks it: without this, every CPU run leaks it
    until the machine runs out of memory. Unlinking at exit is safe: peers have mapped it already."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(name)
    except OSError:
        pass


def _cpu_threads(local_world_size: int) -> None:
    # Ranks on one CPU host share its cores; oversubscribing them makes every rank several times slower.
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_world_size)))


def rendezvous_line(launcher: str, world: int, backend: str) -> str:
    """What rank 0 logs once the process group is up: who started the ranks, how many, and where they met
    (under DeepSpeed's MPI discovery MASTER_ADDR/PORT are known only after it)."""
    env = os.environ
    return (f"dapt: launcher {launcher}: {world} rank{'s' if world != 1 else ''} ({backend}), "
            f"master {env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}")


def setup_distributed(timeout_minutes: float | None = None) -> DistInfo:
    """Initialise the process group on the detected accelerator's backend."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizer threads fight torch for cores
    launcher = _single_process_env()
    acc = get_accelerator()
    backend = acc.communication_backend_name()
    minutes = timeout_minutes or float(os.environ.get("DAPT_DIST_TIMEOUT_MINUTES", "30"))
    started = not dist.is_initialized()
    if started:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                                   timeout=timedelta(minutes=minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    if started and rank == 0:
        print(rendezvous_line(launcher, world, backend), flush=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    # Every rank's host threads (collation, the optimizer on CPU, tokenisers) share the node's cores.
    _cpu_threads(local_world)
    if acc.device_name() == "cpu":
        atexit.register(_release_cpu_shm_buffer, rank)
        device = torch.device("cpu")
    else:
        device = bind_device(acc, local_rank, local_world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                    owns_group=started)


def device_index(local_rank: int, visible: int) -> int:
    """This rank's device among the `visible` ones. All of a node's GPUs visible (one task per GPU, all
    bound to every task): local rank i takes GPU i. Per-task binding (`--gpus-per-task=1`,
    `--gpu-bind=single`, a site default) leaves each task its own one: index 0, whatever its local rank.
    Between the two (a GPU per 2 tasks, say) ranks share modulo the count."""
    if visible < 1:
        raise DaptError("no accelerator device is visible to this rank (CUDA_VISIBLE_DEVICES empty, or the job "
                        "got no GPU: sbatch --gres=gpu:N / --gpus-per-task=1)")
    return local_rank % visible


def bind_device(acc: Any, local_rank: int, local_world: int) -> torch.device:
    """Select and return this rank's device on the accelerator `acc` (DeepSpeed's)."""
    visible = acc.device_count()
    index = device_index(local_rank, visible)
    if 1 < visible < local_world and local_rank == 0:
        print(f"dapt: warning: {local_world} ranks on this node share {visible} visible devices", flush=True)
    acc.set_device(index)
    return torch.device(acc.device_name(index))


def comm_device(info: DistInfo) -> torch.device:
    """Where tensors for collectives live: gloo works on host memory, NCCL and others on the device."""
    return torch.device("cpu") if info.backend == "gloo" else info.device


def _all_reduce(tensor: torch.Tensor, info: DistInfo, op: Any) -> torch.Tensor:
    if info.world_size == 1:
        return tensor.clone()
    t = tensor.to(comm_device(info)).clone()
    dist.all_reduce(t, op=op)
    return t.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all ranks (returns a new tensor on the tensor's original device)."""
    return _all_reduce(tensor, info, dist.ReduceOp.SUM)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


CACHE_SCOPES = ("shared", "node")


def cache_scope() -> str:
    """Where the datasets cache (HF_DATASETS_CACHE) lives, from DAPT_CACHE_SCOPE: `shared` (default: one
    filesystem that every node sees) or `node` (node-local disk, e.g. $TMPDIR on a compute node)."""
    value = os.environ.get("DAPT_CACHE_SCOPE", "").strip().lower() or "shared"
    if value not in CACHE_SCOPES:
        raise DaptError(f"DAPT_CACHE_SCOPE={os.environ['DAPT_CACHE_SCOPE']}: expected shared or node "
                        "(where the datasets cache is: one filesystem for all nodes, or each node's own disk)")
    return value


def is_cache_first(info: DistInfo, scope: str | None = None) -> bool:
    """Whether this rank fills its datasets cache: global rank 0 for a shared cache, the local rank 0
    (LOCAL_RANK, set by every launcher) of each node for node-local caches."""
    return info.local_rank == 0 if (scope or cache_scope()) == "node" else info.is_main


@contextlib.contextmanager
def node_main_first(info: DistInfo, scope: str | None = None) -> Iterator[None]:
    """Main process first, per datasets cache: the first rank of each cache runs the block (reads the
    data, tokenises it, writes the cache) while the other ranks wait; then they run it and reuse that
    cache. With DAPT_CACHE_SCOPE=shared (the default) that is global rank 0;
    with DAPT_CACHE_SCOPE=node it is each node's local rank 0, so every node tokenises once into its own
    cache instead of once per rank (or, with rank 0 first, every rank of the other nodes at once).

    One global barrier: the first ranks reach it after the block, the others before it, so every rank
    calls it exactly once and no per-node process group is needed. A non-first rank enters the block
    (and so calls the hub's `load_dataset`) only after every first rank has left it."""
    first = is_cache_first(info, scope)
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
