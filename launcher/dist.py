"""Process-group set-up: who am I, how many are we, and how long to wait for the others.

Rank discovery, first match wins (``discover_topology``):
1. a launcher's environment: RANK, WORLD_SIZE, LOCAL_RANK (torchrun, the deepspeed launcher);
2. MPI: Open MPI's OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}, or MPICH / Intel MPI's PMI_RANK,
   PMI_SIZE, MPI_LOCALRANKID (``mpirun -np N python -m launcher.pretrain``); rank 0's host and a
   free port travel to the others through mpi4py, whose MPI library must see the same world;
3. Slurm, inside an srun step: SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
   SLURM_LOCALID; MASTER_ADDR is the first host of the job's node list and MASTER_PORT is
   derived from the job id (so two jobs on one node never collide);
4. otherwise one process on this host.
Whatever matched is written back as RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT,
so DeepSpeed, torch.distributed and the data stream all read one truth. An explicit MASTER_ADDR
or MASTER_PORT in the environment always wins (the fix for a wrongly chosen interface).
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    source: str = "single"
    "Where the ranks came from: launcher, openmpi, mpich, slurm or single."

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def slurm_master_port(job_id: int) -> int:
    """A port in [20000, 40000) derived from the job id: the same on every node of the job."""
    return 20000 + job_id % 20000


def slurm_first_host(node_list: str) -> str:
    """First host of a Slurm node list ("node[1-4]" -> "node1"), through scontrol."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RuntimeError("Slurm environment without scontrol on PATH: set MASTER_ADDR to the first node's address")
    hosts = subprocess.run([scontrol, "show", "hostnames", node_list], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def _from_mpi(environ) -> tuple[int, int, int, str] | None:
    if "OMPI_COMM_WORLD_RANK" in environ:
        return (
            int(environ["OMPI_COMM_WORLD_RANK"]),
            int(environ["OMPI_COMM_WORLD_SIZE"]),
            int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            "openmpi",
        )
    if "PMI_RANK" in environ and "PMI_SIZE" in environ:
        return (
            int(environ["PMI_RANK"]),
            int(environ["PMI_SIZE"]),
            int(environ.get("MPI_LOCALRANKID", environ.get("PMI_LOCAL_RANK", 0))),
            "mpich",
        )
    return None


def _mpi_rendezvous(environ, rank: int, world_size: int) -> tuple[str, str]:
    """Rank 0's host and a free port of its, shared with every rank through MPI.

    mpi4py loads the first MPI library it finds (the venv's Open MPI wheel before the system's).
    Started by another MPI's mpirun, that library sees a world of one and every rank would wait
    for a master of its own: refuse instead.
    """
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:
        raise RuntimeError(
            f"an MPI launcher started this process but mpi4py cannot load an MPI library ({error}): "
            "install the project's dependencies (mpi4py, openmpi) or set MASTER_ADDR and MASTER_PORT"
        ) from error
    mpi_size = MPI.COMM_WORLD.Get_size()
    if mpi_size != world_size:
        raise RuntimeError(
            f"the MPI launcher started {world_size} ranks but mpi4py's MPI library sees {mpi_size}: mpirun and "
            f"mpi4py belong to different MPI installations ({MPI.Get_library_version().splitlines()[0]}); use the "
            "venv's mpirun, point MPI4PY_LIBMPI at the launcher's libmpi, or set MASTER_ADDR and MASTER_PORT"
        )
    address = environ.get("MASTER_ADDR") or (socket.gethostname() if rank == 0 else None)
    port = environ.get("MASTER_PORT") or (str(free_port()) if rank == 0 else None)
    return MPI.COMM_WORLD.bcast((address, port), root=0)


def discover_topology(environ=None) -> Topology:
    """See the module docstring; updates ``environ`` (default os.environ) in place."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank, source = int(environ.get("LOCAL_RANK", rank)), "launcher"
        if world_size > 1 and "MASTER_PORT" not in environ:
            # A free port of each rank's own would leave every rank waiting for a different master.
            raise RuntimeError(
                f"RANK and WORLD_SIZE={world_size} are set but MASTER_PORT is not: "
                "set MASTER_ADDR and MASTER_PORT (the same on every rank)"
            )
    elif (mpi := _from_mpi(environ)) is not None:
        rank, world_size, local_rank, source = mpi
        if world_size > 1 and not ("MASTER_ADDR" in environ and "MASTER_PORT" in environ):
            environ["MASTER_ADDR"], environ["MASTER_PORT"] = _mpi_rendezvous(environ, rank, world_size)
    elif "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        rank = int(environ["SLURM_PROCID"])
        world_size = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", 1)))
        local_rank, source = int(environ.get("SLURM_LOCALID", 0)), "slurm"
        if "MASTER_ADDR" not in environ:
            environ["MASTER_ADDR"] = slurm_first_host(environ["SLURM_JOB_NODELIST"]) if world_size > 1 else "127.0.0.1"
        environ.setdefault("MASTER_PORT", str(slurm_master_port(int(environ.get("SLURM_JOB_ID", 0)))))
    else:
        rank, world_size, local_rank, source = 0, 1, 0, "single"
    if not 0 <= rank < world_size:
        raise RuntimeError(f"rank {rank} is outside a world of {world_size} ({source} environment): check the launcher")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")  # one host (a launcher's, a single MPI rank's, ours)
    environ.setdefault("MASTER_PORT", str(free_port()))
    environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    return Topology(rank=rank, world_size=world_size, local_rank=local_rank, source=source)


def set_default_timeouts(timeout_s: float) -> datetime.timedelta:
    """Every process group created from now on without an explicit timeout gets this one.

    DeepSpeed clones the world group for ZeRO without passing a timeout, so setting it only on
    init_process_group would leave those collectives waiting for the 30-minute default.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    torch_dist.distributed_c10d.default_pg_timeout = timeout
    torch_dist.distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


ABORT_KEY = "performer/abort"


def _default_store():
    """The rendezvous store of the default process group (hosted by rank 0), or None."""
    if not ranks_connected():
        return None
    return torch_dist.distributed_c10d._get_default_store()


def _rendezvous_tcp_store(store):
    """The TCPStore under the default store's prefixes (abort flags are set and awaited there,
    unprefixed, so that a second client of the same server sees them), or None."""
    while store is not None and not isinstance(store, torch_dist.TCPStore):
        store = getattr(store, "underlying_store", None)
    return store


def post_abort(rank: int, reason: str) -> None:
    """Tell every rank's PeerAbortWatchdog that this rank has given up on the job (best effort)."""
    try:
        store = _rendezvous_tcp_store(_default_store())
        if store is not None:
            store.set(ABORT_KEY, f"rank {rank}: {reason}")
    except Exception:  # the store may be gone with rank 0; the watchdog treats that as an abort too
        pass


class PeerAbortWatchdog:
    """Ends this rank, even a hung one, once another rank has given up on the job.

    A rank whose collective times out or breaks stops with a clear error and posts an abort flag in
    the rendezvous store (`post_abort`). The rank it waited for may be hung outside any collective
    (a deadlock, a stuck read, an injected sleep), where no timeout reaches it, and it defers the
    launcher's SIGTERM to a step boundary it never reaches: it would hold its devices until a
    SIGKILL (30 s later under the deepspeed launcher, never under srun without kill-on-bad-exit).
    A daemon thread waits for the flag in the store and ends the process when it is set, or when
    the store itself is gone (rank 0, which hosts it, has exited), once the training loop is inside
    a step (`arm`). Nothing is timed here: a step may take as long as it needs; the collectives'
    `dist.timeout_s` decides when a peer has waited too long. The loop disarms it at step
    boundaries and before it ends, so a rank 0 that finishes or stops first never trips the others.

    The wait is one blocking request per rank, answered by rank 0's store when the flag is set
    (`benchmarks/store_load.py`): rank 0's load does not grow with a polling rate times the number
    of ranks. It runs on a client of its own, because a TCPStore client serves one request at a
    time and a blocked wait would stall the process group's own store requests; that client
    connects on the watchdog's thread, so a rank's start-up waits for one connection, not two. The
    wait is renewed every `renew_s` (an expired wait checks that the store still answers), so a rank 0
    whose host vanished without closing its connections is noticed within that time.
    """

    def __init__(
        self,
        rank: int,
        timeout_s: float,
        exit_code: int,
        poll_s: float = 0.5,
        renew_s: float = 3600.0,
        store: torch_dist.TCPStore | None = None,
    ):
        """``store``: the TCPStore whose server holds the flag (default: the rendezvous store)."""
        import threading

        self.rank, self.timeout_s, self.exit_code, self.poll_s = rank, timeout_s, exit_code, poll_s
        self.renew_s = renew_s
        self._step: int | None = None
        self._client = None
        self.connected = threading.Event()  # set once the watchdog's own client reaches the store
        server = store or _rendezvous_tcp_store(_default_store())
        if server is not None:  # connected on the thread: start-up does not wait for a second connection
            threading.Thread(target=self._watch, args=(server,), name="peer-abort-watchdog", daemon=True).start()

    @staticmethod
    def _own_client(store, timeout_s: float):
        """A second client of the rendezvous store's server."""
        timeout = datetime.timedelta(seconds=timeout_s)
        return torch_dist.TCPStore(store.host, store.port, None, False, timeout, wait_for_workers=False)

    def arm(self, step: int) -> None:
        self._step = step

    def disarm(self) -> None:
        self._step = None

    def _wait_for_abort(self, server) -> str:
        """Block until a rank posts the abort flag (its reason) or the store is gone."""
        try:
            self._client = self._own_client(server, self.timeout_s)
            self.connected.set()
            while True:
                try:
                    self._client.wait([ABORT_KEY], datetime.timedelta(seconds=self.renew_s))
                    return self._client.get(ABORT_KEY).decode()
                except torch_dist.DistStoreError:  # the wait expired: renew it if the store still answers
                    self._client.check([ABORT_KEY])
        except Exception as error:  # noqa: BLE001 - any failure to reach the store means rank 0 is gone
            return f"rank 0, which hosts the rendezvous store, is gone ({type(error).__name__})"

    def _watch(self, server) -> None:
        reason = self._wait_for_abort(server)
        if reason.startswith(f"rank {self.rank}: "):
            return  # this rank gave up itself: its own error path reports and exits
        while (step := self._step) is None:  # act only inside a step: between steps the loop decides
            time.sleep(self.poll_s)
        print(
            f"[rank {self.rank}] error: the job is over ({reason}) while this rank was still inside step "
            f"{step}, so it stops too instead of waiting or holding the job. If this rank is the hung one "
            f"(the others gave up after dist.timeout_s={self.timeout_s:g} s), find where it was (py-spy dump, "
            "its log); raise dist.timeout_s if steps legitimately take longer",
            file=sys.stderr,
            flush=True,
        )
        os._exit(self.exit_code)


def _skip_shared_memory_inference_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op.

    Only its inference all-reduce uses that op, never training; but loading it JIT-compiles C++ on
    a fresh machine and maps a 69 MB /dev/shm segment per rank that is never unlinked: RAM leaked
    by every job (7.5 GB after a day of tests here).
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
    if backend == "nccl":
        # Before the first collective (the seed broadcast comes before DeepSpeed sets the device):
        # NCCL runs a rank's collectives on its current GPU, and ranks sharing cuda:0 hang or fail.
        torch.cuda.set_device(topology.local_rank)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    return topology


def collective_device() -> torch.device:
    """Where the small tensors of this module's collectives live: NCCL reduces CUDA tensors only
    (a CPU tensor raises "No backend type associated with device type cpu"), gloo CPU ones."""
    if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_int(value: int, source: int = 0) -> int:
    """``value`` from rank ``source`` on every rank (a 64-bit integer)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    if ranks_connected():
        torch_dist.broadcast(tensor, src=source)
    return int(tensor.item())


def any_rank(flags: list[bool]) -> list[bool]:
    """For each flag, whether any rank set it: one all-reduce however many flags."""
    tensor = torch.tensor([int(flag) for flag in flags], dtype=torch.int64, device=collective_device())
    if ranks_connected():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def all_mean(values: list[float]) -> list[float]:
    """Element-wise mean over ranks."""
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if ranks_connected():
        torch_dist.all_reduce(tensor)
        tensor /= torch_dist.get_world_size()
    return tensor.tolist()


def ranks_connected() -> bool:
    """Whether this process is in a process group of more than one rank (collectives reach peers)."""
    return torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if ranks_connected():
        values = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(values, value)
        return values
    return [value]


def shutdown() -> None:
    """Leave the process group before the interpreter exits.

    A gloo group still alive at exit is torn down by static destructors while its worker threads
    are joinable: the process then aborts ("terminate called without an active exception", exit
    -6) after having finished its work, intermittently.
    """
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()
