"""Rank discovery (launcher.dist.discover_topology) on plain dicts: which environment wins, what it
writes back, and the errors that replace hangs."""

import os
import subprocess
import sys

import pytest
from jobs import REPO, launch_environment, removing_new_open_mpi_segments

from launcher import dist
from launcher.dist import discover_topology, slurm_master_port

PLACEMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_mpi_rendezvous(monkeypatch):
    """Records rendezvous calls instead of loading MPI: the tests see what would be exchanged."""
    calls = []

    def rendezvous(environ, rank, world_size):
        calls.append((rank, world_size))
        return "mpi-master", "4242"

    monkeypatch.setattr(dist, "_mpi_rendezvous", rendezvous)
    return calls


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that expands any node list to node3 node4 (first host: node3)."""
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node3\\nnode4\\n"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


def placement(environ):
    return {name: environ.get(name) for name in PLACEMENT}


OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
SLURM_STEP = {
    "SLURM_PROCID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "node[3-4]",
}


# ------------------------------------------------------------------------------ order of precedence


def test_launcher_environment_wins_over_mpi_and_slurm(no_mpi_rendezvous):
    environ = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        **OPEN_MPI,
        **SLURM_STEP,
    }
    topology = discover_topology(environ)
    assert (topology.rank, topology.world_size, topology.local_rank, topology.source) == (1, 2, 1, "launcher")
    assert placement(environ) == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert no_mpi_rendezvous == []


def test_launcher_environment_defaults_local_rank_and_address():
    environ = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    topology = discover_topology(environ)
    assert topology.local_rank == 0 and topology.is_main
    assert environ["MASTER_ADDR"] == "127.0.0.1" and environ["LOCAL_RANK"] == "0"


def test_launcher_environment_without_master_port_is_an_error_not_a_hang():
    # Each rank would otherwise pick a free port of its own and wait for a different master.
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        discover_topology({"RANK": "0", "WORLD_SIZE": "2"})
    assert discover_topology({"RANK": "0", "WORLD_SIZE": "1"}).world_size == 1


def test_mpi_wins_over_slurm_because_mpirun_inside_an_allocation_launches_through_srun(no_mpi_rendezvous):
    environ = {**OPEN_MPI, **SLURM_STEP}
    topology = discover_topology(environ)
    assert (topology.rank, topology.world_size, topology.source) == (3, 4, "openmpi")
    assert no_mpi_rendezvous == [(3, 4)]


# ------------------------------------------------------------------------------ MPI


def test_open_mpi_variables_and_the_rendezvous_are_written_back(no_mpi_rendezvous):
    environ = dict(OPEN_MPI)
    topology = discover_topology(environ)
    assert (topology.rank, topology.world_size, topology.local_rank, topology.source) == (3, 4, 1, "openmpi")
    assert placement(environ) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "mpi-master",
        "MASTER_PORT": "4242",
    }
    assert no_mpi_rendezvous == [(3, 4)]


@pytest.mark.parametrize("local", [{"MPI_LOCALRANKID": "1"}, {"PMI_LOCAL_RANK": "1"}], ids=["hydra", "pmi"])
def test_mpich_and_intel_mpi_pmi_variables(local, no_mpi_rendezvous):
    environ = {"PMI_RANK": "1", "PMI_SIZE": "2", **local}
    topology = discover_topology(environ)
    assert (topology.rank, topology.world_size, topology.local_rank, topology.source) == (1, 2, 1, "mpich")
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("mpi-master", "4242")


def test_pmi_rank_without_pmi_size_is_not_mpi():
    assert discover_topology({"PMI_RANK": "0"}).source == "single"


def test_one_mpi_rank_needs_no_rendezvous(no_mpi_rendezvous):
    environ = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}
    assert discover_topology(environ).world_size == 1
    assert no_mpi_rendezvous == [] and environ["MASTER_ADDR"] == "127.0.0.1"


def test_explicit_master_address_and_port_win_under_mpi(no_mpi_rendezvous):
    environ = {**OPEN_MPI, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31000"}
    discover_topology(environ)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("10.1.2.3", "31000")
    assert no_mpi_rendezvous == []


def test_an_mpi_library_that_sees_another_world_is_an_error():
    # Started without mpirun, mpi4py's Open MPI comes up as a world of one: what a foreign mpirun
    # (another MPI installation) gives too. Each rank would wait for a master of its own.
    code = "from launcher.dist import discover_topology; discover_topology()"
    environment = launch_environment(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2")
    with removing_new_open_mpi_segments():  # the singleton exits on the error without finalizing
        completed = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True, text=True, timeout=60
        )
    assert completed.returncode != 0
    assert "sees 1" in completed.stderr and "different MPI installations" in completed.stderr, completed.stderr[-2000:]


# ------------------------------------------------------------------------------ Slurm


def test_slurm_inside_a_step_first_host_and_port_from_the_job_id(fake_scontrol):
    environ = dict(SLURM_STEP)
    topology = discover_topology(environ)
    # SLURM_STEP_NUM_TASKS (this step) wins over SLURM_NTASKS (the allocation).
    assert (topology.rank, topology.world_size, topology.local_rank, topology.source) == (1, 2, 0, "slurm")
    assert placement(environ) == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "node3",
        "MASTER_PORT": str(slurm_master_port(123456)),
    }


def test_a_bare_allocation_shell_is_one_process():
    # sbatch's batch shell has SLURM_PROCID=0 and SLURM_NTASKS but no step: it is not a rank of N.
    environ = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"}
    topology = discover_topology(environ)
    assert (topology.rank, topology.world_size, topology.source) == (0, 1, "single")


def test_explicit_master_address_and_port_win_under_slurm():
    environ = {**SLURM_STEP, "MASTER_ADDR": "10.9.8.7", "MASTER_PORT": "30001"}  # no scontrol needed
    discover_topology(environ)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("10.9.8.7", "30001")


def test_slurm_without_scontrol_says_to_set_master_addr(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        discover_topology(dict(SLURM_STEP))


def test_a_one_task_slurm_step_needs_no_scontrol(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    environ = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}
    assert discover_topology(environ).source == "slurm"
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("127.0.0.1", str(slurm_master_port(7)))


def test_port_from_the_job_id_is_stable_in_range_and_differs_between_jobs():
    ports = [slurm_master_port(job) for job in range(100_000, 100_050)]
    assert all(20000 <= port < 40000 for port in ports)
    assert len(set(ports)) == len(ports)
    assert slurm_master_port(123456) == slurm_master_port(123456) == 23456


# ------------------------------------------------------------------------------ errors, defaults


@pytest.mark.parametrize(
    "environ",
    [
        {"RANK": "0", "WORLD_SIZE": "1"},
        dict(OPEN_MPI),
        {"PMI_RANK": "0", "PMI_SIZE": "1"},
        {**SLURM_STEP, "MASTER_ADDR": "h"},
        {},
    ],
    ids=["launcher", "openmpi", "mpich", "slurm", "single"],
)
def test_every_source_leaves_nothing_for_deepspeed_to_discover(environ):
    # deepspeed.init_distributed, with its default auto_mpi_discovery=True, runs its own mpi4py
    # discovery (OMPI_* only, fixed port 29500) when it starts a group with one of these missing.
    discover_topology(environ)
    assert {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} <= environ.keys()


@pytest.mark.parametrize(
    "environ",
    [
        {"RANK": "2", "WORLD_SIZE": "2", "MASTER_PORT": "29500"},
        {"RANK": "-1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"},
        {"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
        {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"},
    ],
    ids=["launcher", "negative", "openmpi", "slurm"],
)
def test_a_rank_outside_the_world_is_an_error(environ):
    with pytest.raises(RuntimeError, match="outside a world"):
        discover_topology(environ)


def test_no_launcher_is_one_process_on_this_host():
    environ = {}
    topology = discover_topology(environ)
    assert (topology.rank, topology.world_size, topology.local_rank, topology.source) == (0, 1, 0, "single")
    assert environ["MASTER_ADDR"] == "127.0.0.1" and 0 < int(environ["MASTER_PORT"]) < 65536


def test_a_given_dict_leaves_the_process_environment_alone(monkeypatch):
    for name in PLACEMENT:
        monkeypatch.delenv(name, raising=False)
    discover_topology({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"})
    assert not any(name in os.environ for name in PLACEMENT)


def test_on_gpus_each_rank_takes_its_own_device_before_joining_and_collectives_use_it(monkeypatch):
    """NCCL reduces CUDA tensors only, on the rank's current device: the trainer's first collective
    (the seed broadcast) comes before DeepSpeed sets the device, so init_distributed sets it."""
    import deepspeed
    import torch
    import torch.distributed as torch_dist

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, **_: calls.append(("join", dist_backend)))
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # init_distributed sets these
        monkeypatch.setattr(torch_dist.distributed_c10d, name, getattr(torch_dist.distributed_c10d, name))
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    monkeypatch.setattr(os, "environ", dict(environ))

    topology = dist.init_distributed(timeout_s=60)

    assert topology.local_rank == 3
    assert calls == [("set_device", 3), ("join", "nccl")]
    assert dist.collective_device() == torch.device("cpu")  # no group joined here
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch_dist, "get_backend", lambda *_: "nccl")
    assert dist.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch_dist, "get_backend", lambda *_: "gloo")
    assert dist.collective_device() == torch.device("cpu")
