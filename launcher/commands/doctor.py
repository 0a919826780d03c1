"""`performer doctor`: does this launch make a working process group? Answers in seconds.

    python -m launcher doctor [--timeout 30]                       (one process)
    mpirun -np N python -m launcher doctor
    srun python -m launcher doctor                                 (inside an allocation)
    deepspeed --num_gpus N --module launcher doctor
    torchrun --nproc_per_node N -m launcher doctor

Every rank prints the topology it resolved (launcher.dist, the trainer's own discovery) before it
tries to join, so a wrong rank, world size or master shows even when the group never forms. Then
the ranks join the process group (torch.distributed; gloo on CPUs, nccl on GPUs), check that no two
ranks of one host share a local rank, time an all-reduce (bandwidth and small-message latency,
printed by rank 0), check its result and pass a barrier. Exit 0 when all of that worked.

One deadline covers the whole run: a rendezvous nobody answers, a world size that does not match
the processes started, or a dead peer ends every rank that is still waiting with exit 1 within
``--timeout`` seconds, and a message saying what to check.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as torch_dist

from launcher.dist import Topology, discover_topology, set_default_timeouts
from launcher.errors import EXIT_FAILED
from performer.errors import InputError

WHAT_TO_CHECK = """\
what to check:
  - every rank belongs to one launch: the same WORLD_SIZE everywhere (this rank has {world_size}) and
    each RANK 0..WORLD_SIZE-1 started once; a rank that died says why in its own log
  - MASTER_ADDR={master_addr} resolves to the master node and is reachable from every node
    (getent hosts {master_addr}; nc -z {master_addr} {master_port})
  - MASTER_PORT={master_port} is free on the master and no firewall blocks it (or the ports the
    backend opens next to it) between nodes
  - the network interface: set GLOO_SOCKET_IFNAME (CPUs) or NCCL_SOCKET_IFNAME (GPUs) to the interface
    that joins the nodes (ip -br addr); NCCL_DEBUG=INFO says more on GPUs"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check the launch: topology on every rank, a timed all-reduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=lambda args: run(args.timeout, args.size_mb, args.repeats))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the whole check, rendezvous included, fails after this long (default 30)",
    )
    parser.add_argument(
        "--size-mb",
        type=float,
        default=4.0,
        metavar="MB",
        help="all-reduce message size in MiB for the bandwidth figure (default 4)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed all-reduces (default 5)")
    # The deepspeed launcher appends --local_rank; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


# ------------------------------------------------------------------------------ reporting


class _Report:
    """Prints a rank's failure once (the main thread and the deadline may race) and ends the process.

    os._exit, not an exception: a process group with a missing peer can hang in its destructor,
    and under mpirun a rank that leaves without finalising makes mpirun end the others at once.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.label = f"rank {os.environ.get('RANK', '?')}"
        self.phase = "discovering the topology"
        self.context = {
            "world_size": "?",
            "master_addr": os.environ.get("MASTER_ADDR", "?"),
            "master_port": os.environ.get("MASTER_PORT", "?"),
        }

    def fail(self, problem: str) -> None:
        if self.lock.acquire(blocking=False):
            message = f"doctor: {self.label}: FAILED {self.phase}: {problem}\n{WHAT_TO_CHECK.format(**self.context)}\n"
            sys.stdout.flush()
            sys.stderr.write(message)
            sys.stderr.flush()
            os._exit(EXIT_FAILED)
        threading.Event().wait()  # the other thread is reporting and exiting


@contextmanager
def _deadline(seconds: float, report: _Report):
    """Fail the run from a watchdog thread when the block has not finished after ``seconds``."""
    finished = threading.Event()

    def watch() -> None:
        if not finished.wait(seconds):
            report.fail(f"still waiting after {seconds:g} s (--timeout)")

    threading.Thread(target=watch, name="doctor-deadline", daemon=True).start()
    try:
        yield
    finally:
        finished.set()


def describe_devices(backend: str, local_rank: int) -> str:
    """The rank's device, and the cores it may run on: mpirun binds each of <= 2 ranks to one core
    unless told --bind-to none, and the rank's data workers and threads then share that core."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = f"{usable}/{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if backend == "nccl":
        count = torch.cuda.device_count()
        name = torch.cuda.get_device_name(local_rank) if local_rank < count else "missing"
        return f"cuda:{local_rank} ({name}; {count} visible; {cores})"
    return f"cpu ({cores})"


def describe(topology: Topology, backend: str) -> str:
    """The rank's one line: everything the trainer would use to join."""
    return (
        f"doctor: rank {topology.rank}/{topology.world_size} local_rank {topology.local_rank} "
        f"source={topology.source} host={socket.gethostname()} "
        f"master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} backend={backend} "
        f"devices={describe_devices(backend, topology.local_rank)}"
    )


def duplicate_local_ranks(placements: list[tuple[str, int]]) -> list[str]:
    """Ranks that share (host, local rank) with an earlier rank: they would share a GPU."""
    first: dict[tuple[str, int], int] = {}
    clashes = []
    for rank, placement in enumerate(placements):
        if placement in first:
            clashes.append(f"ranks {first[placement]} and {rank} both have local_rank {placement[1]} on {placement[0]}")
        first.setdefault(placement, rank)
    return clashes


# ------------------------------------------------------------------------------ measurements


def time_all_reduce(numel: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per all-reduce of ``numel`` float32 values (after one warm-up); the sum is checked."""
    rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    tensor = torch.empty(numel, dtype=torch.float32, device=device)
    expected = world_size * (world_size + 1) / 2
    seconds = []
    for attempt in range(repeats + 1):
        tensor.fill_(rank + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch_dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt > 0:
            seconds.append(time.perf_counter() - start)
    ends = tensor[[0, -1]].tolist()
    if ends != [expected, expected]:
        raise RuntimeError(f"all-reduce returned {ends}, expected {expected} (sum of 1..{world_size}): corrupted data")
    return seconds


def bandwidth_line(numel: int, big: list[float], small: list[float], world_size: int, backend: str) -> str:
    size = numel * 4
    median = statistics.median(big)
    algbw = size / median
    busbw = algbw * 2 * (world_size - 1) / world_size  # bytes each link carries in a ring all-reduce
    return (
        f"doctor: all-reduce {size / 2**20:.1f} MiB x {len(big)} on {world_size} rank(s) ({backend}): "
        f"median {median * 1e3:.2f} ms (min {min(big) * 1e3:.2f}), algbw {algbw / 1e9:.3f} GB/s, "
        f"busbw {busbw / 1e9:.3f} GB/s; latency (4 B x {len(small)}): median "
        f"{statistics.median(small) * 1e6:.0f} us"
    )


# ------------------------------------------------------------------------------ the check


def check_options(timeout_s: float, size_mb: float, repeats: int) -> None:
    """InputError for an option nothing can be measured with, before any rank starts waiting."""
    if not timeout_s > 0:
        raise InputError(f"--timeout must be > 0 seconds, got {timeout_s:g}")
    if not size_mb > 0:
        raise InputError(f"--size-mb must be > 0 MiB, got {size_mb:g}")
    if repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}")


def run(timeout_s: float = 30.0, size_mb: float = 4.0, repeats: int = 5) -> int:
    check_options(timeout_s, size_mb, repeats)
    started = time.monotonic()
    report = _Report()
    with _deadline(timeout_s, report):
        try:
            topology = discover_topology()
        except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as error:
            report.fail(str(error))
        report.label = f"rank {topology.rank}/{topology.world_size}"
        report.context.update(
            world_size=topology.world_size, master_addr=os.environ["MASTER_ADDR"], master_port=os.environ["MASTER_PORT"]
        )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        print(describe(topology, backend), flush=True)

        report.phase = f"joining the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if backend == "nccl":
            if topology.local_rank >= torch.cuda.device_count():
                report.fail(f"local_rank {topology.local_rank} but {torch.cuda.device_count()} GPU(s) visible")
            torch.cuda.set_device(topology.local_rank)
        device = torch.device("cuda", topology.local_rank) if backend == "nccl" else torch.device("cpu")
        timeout = set_default_timeouts(timeout_s)
        try:
            torch_dist.init_process_group(backend, timeout=timeout)
            # Gloo connects lazily; a first collective proves every pair can talk.
            placements: list = [None] * topology.world_size
            torch_dist.all_gather_object(placements, (socket.gethostname(), topology.local_rank))
        except Exception as error:  # noqa: BLE001 - whatever torch raises, the advice is the same
            report.fail(f"{type(error).__name__}: {error}")

        report.phase = "checking placements"
        clashes = duplicate_local_ranks(placements)
        if clashes and backend == "nccl":
            report.fail("; ".join(clashes) + " (check LOCAL_RANK / the launcher's tasks per node)")
        for clash in clashes if topology.is_main else []:
            print(f"doctor: warning: {clash}", flush=True)

        report.phase = "timing all-reduce"
        try:
            numel = max(1, int(size_mb * 2**20) // 4)
            big = time_all_reduce(numel, repeats, device)
            small = time_all_reduce(1, max(20, repeats), device)
            report.phase = "in the final barrier"
            torch_dist.barrier()
        except Exception as error:  # noqa: BLE001 - a dead peer surfaces as any of several errors
            report.fail(f"{type(error).__name__}: {error} (a peer died or the network dropped)")
        if topology.is_main:
            print(bandwidth_line(numel, big, small, topology.world_size, backend), flush=True)
            print(
                f"doctor: OK, {topology.world_size} rank(s) joined, all-reduce correct, barrier passed "
                f"in {time.monotonic() - started:.1f} s",
                flush=True,
            )
        torch_dist.destroy_process_group()
    return 0
