"""Process-group set-up: who am I, how many are we, and how long to wait for the others.

Rank discovery here reads the torchrun / deepspeed launcher environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it the job is a single process on this host.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def discover_topology() -> Topology:
    """From the launcher's environment; a lone process becomes rank 0 of 1 on localhost."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}: check the launcher's environment")
    return Topology(rank=rank, world_size=world_size, local_rank=local_rank)


def set_default_timeouts(timeout_s: float) -> datetime.timedelta:
    """Every process group created from now on without an explicit timeout gets this one.

    DeepSpeed clones the world group for ZeRO without passing a timeout, so setting it only on
    init_process_group would leave those collectives waiting for the 30-minute default.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    torch_dist.distributed_c10d.default_pg_timeout = timeout
    torch_dist.distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def _skip_shared_memory_inference_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op.

    Only its inference all-reduce uses that op, never training; but loading it JIT-compiles C++ on
    a fresh machine, maps a 69 MB /dev/shm segment per rank that is never unlinked (RAM leaked
    by every job), and a later job that gets the same MASTER_PORT reopens the stale segment and
    can abort ("terminate called without an active exception").
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: float) -> Topology:
    """Discover the topology, set timeouts, and join the group (gloo on CPU, nccl on GPUs)."""
    import deepspeed

    _skip_shared_memory_inference_op()
    topology = discover_topology()
    timeout = set_default_timeouts(timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    return topology


def broadcast_int(value: int, source: int = 0) -> int:
    """``value`` from rank ``source`` on every rank (a 64-bit integer)."""
    tensor = torch.tensor([value], dtype=torch.int64)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.broadcast(tensor, src=source)
    return int(tensor.item())


def all_agree(flag: bool, op=torch_dist.ReduceOp.MAX) -> bool:
    """Combine a boolean over ranks: MAX = any rank says yes, MIN = every rank says yes."""
    tensor = torch.tensor([int(flag)], dtype=torch.int64)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(tensor, op=op)
    return bool(tensor.item())


def all_mean(values: list[float]) -> list[float]:
    """Element-wise mean over ranks."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(tensor)
        tensor /= torch_dist.get_world_size()
    return tensor.tolist()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()
