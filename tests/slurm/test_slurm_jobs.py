"""The shipped sbatch scripts on a real Slurm (two emulated nodes, conftest.py): they train,
checkpoint and lower the loss on 2 nodes x 1 rank, a USR1 makes the job save, requeue itself and
resume where it stopped, and a killed rank ends the whole job within a minute.

Jobs run one at a time with the test-sized settings of tests/launcher/jobs.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from jobs import TEST_SETTINGS

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"srun": "slurm/pretrain.sbatch", "deepspeed": "slurm/pretrain-deepspeed.sbatch"}

pytestmark = pytest.mark.slow


@dataclass
class Job:
    name: str
    output_dir: Path
    process: subprocess.Popen
    started: float

    @property
    def log_path(self) -> Path | None:
        found = sorted(self.output_dir.parent.glob(f"{self.name}-*.out"))
        return found[0] if found else None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def job_id(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.log_path is not None:
                return int(self.log_path.stem.rsplit("-", 1)[1])
            time.sleep(0.2)
        raise AssertionError(f"job {self.name} wrote no log within 30 s")

    def records(self, kind: str) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(r["step"] >= step for r in self.records("train")):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"job ended (sbatch {self.process.returncode}) before step {step}:\n{self.log()}")
            time.sleep(0.2)
        raise AssertionError(f"no step {step} within {timeout} s:\n{self.log()}")

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", str(self.job_id())], check=False)
            self.process.wait(timeout=60)
            raise AssertionError(f"job {self.name} still running after {timeout} s:\n{self.log()}") from None


def submit(
    script: str | Path,
    name: str,
    tmp_path: Path,
    data: Path,
    *settings: str,
    nodes: int = 2,
    tasks_per_node: int = 1,
    arguments: list[str] | None = None,
) -> Job:
    """`sbatch --wait` in the background; the job's own log and output directory are under tmp_path."""
    output_dir = tmp_path / name
    if arguments is None:
        overrides = [*TEST_SETTINGS, f"data.manifest={data / 'train'}", f"train.output_dir={output_dir}", *settings]
        arguments = ["configs/tiny.yaml", "--set", *overrides]
    command = [
        "sbatch",
        "--wait",
        f"--chdir={REPO}",
        f"--job-name={name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        "--time=5",
        f"--output={tmp_path / name}-%j.out",
        str(REPO / script),
        *arguments,
    ]
    process = subprocess.Popen(
        command, env=job_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return Job(name, output_dir, process, time.monotonic())


def job_environment() -> dict:
    """This environment (sbatch and srun pass it on) without anything that would pose as a launcher."""
    environment = {k: v for k, v in os.environ.items() if not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(variable, None)
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return environment


def trainer_pid(output_dir: Path, rank: int) -> int:
    """The pid of the trainer process of `rank` in the job writing to output_dir."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
            environ = dict(
                item.split("=", 1) for item in (entry / "environ").read_bytes().decode().split("\0") if "=" in item
            )
        except OSError:
            continue
        is_trainer = comm.startswith("python") and any(
            a == "-m" and b == "launcher.pretrain" for a, b in zip(argv, argv[1:])
        )
        if is_trainer and f"train.output_dir={output_dir}" in argv:
            # RANK from the deepspeed launcher; under srun the trainer derives it from SLURM_PROCID
            if int(environ.get("RANK", environ.get("SLURM_PROCID", -1))) == rank:
                return int(entry.name)
    raise AssertionError(f"no trainer of rank {rank} writing to {output_dir}")


def assert_trained(job: Job, returncode: int, max_steps: int = 8) -> None:
    log = job.log()
    assert returncode == 0, log
    assert "2 rank(s)" in log, log
    assert re.search(r"\[slurm\] job \d+ run 1 on node\[1-2\]", log), log
    checkpoints = job.output_dir / "checkpoints"
    assert (checkpoints / f"step{max_steps:08d}" / "COMPLETE").is_file(), sorted(checkpoints.iterdir())
    assert (checkpoints / "latest").read_text().strip() == f"step{max_steps:08d}"
    losses = {r["step"]: r["loss"] for r in job.records("train")}
    assert sorted(losses) == list(range(1, max_steps + 1))
    assert losses[max_steps] < losses[1] - 0.5, losses


def test_srun_script_trains_on_two_nodes(slurm_cluster, slurm_data, tmp_path):
    job = submit(SCRIPTS["srun"], "srun", tmp_path, slurm_data)
    returncode = job.wait()
    print(f"srun job: {time.monotonic() - job.started:.1f} s from submission to sbatch --wait's return")
    assert_trained(job, returncode)
    log = job.log()
    assert "srun exited 0" in log and "node[1-2]: 2 tasks" in log, log
    assert not list(REPO.glob("*.hostfile"))


def test_deepspeed_script_trains_on_two_nodes(slurm_cluster, slurm_data, tmp_path):
    job = submit(SCRIPTS["deepspeed"], "deepspeed", tmp_path, slurm_data)
    returncode = job.wait()
    print(f"deepspeed job: {time.monotonic() - job.started:.1f} s from submission to sbatch --wait's return")
    assert_trained(job, returncode)
    log = job.log()
    # one launcher per node, each starting its node's rank of a 2-rank world
    assert "2 nodes x 1 ranks" in log, log
    assert "nnodes=2, num_local_procs=1, node_rank=0" in log, log
    assert "nnodes=2, num_local_procs=1, node_rank=1" in log, log
    assert log.count("dist_world_size=2") == 2, log
    assert not list(REPO.glob(f"deepspeed-{job.job_id()}.hostfile")), "the per-job hostfile is removed at exit"


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_usr1_saves_requeues_and_resumes(slurm_cluster, slurm_data, tmp_path, launcher):
    max_steps = 150
    job = submit(
        SCRIPTS[launcher],
        f"preempt-{launcher}",
        tmp_path,
        slurm_data,
        f"train.max_steps={max_steps}",
        "checkpoint.interval=1000",
        "eval.interval=0",
    )
    job.wait_for_step(5)
    signalled = time.monotonic()
    # what Slurm does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job.job_id())], check=True)
    returncode = job.wait()
    print(f"{launcher} preemption: {time.monotonic() - signalled:.1f} s from USR1 to the requeued run's end")
    log = job.log()
    assert returncode == 0, log
    stopped = re.search(r"stopping at step (\d+) \(SIGUSR1\): checkpoint saved", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 5 <= step < max_steps
    assert "srun exited 75" in log and "requeued: it resumes from its last checkpoint" in log, log
    second = log[log.index("run 2 on node[1-2]") :]
    assert f"resumed from step{step:08d} at step {step}" in second, log
    assert "srun exited 0" in second, log
    assert "run 3 " not in log
    # the second run continued from the saved step: every step once, none lost, none repeated
    steps = [r["step"] for r in job.records("train")]
    assert steps == list(range(1, max_steps + 1)), steps
    latest = (job.output_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{max_steps:08d}"


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_a_dead_rank_ends_the_job_within_a_minute(slurm_cluster, slurm_data, tmp_path, launcher):
    job = submit(
        SCRIPTS[launcher],
        f"dead-{launcher}",
        tmp_path,
        slurm_data,
        "train.max_steps=5000",
        "checkpoint.interval=5000",
        "eval.interval=0",
        "dist.timeout_s=20",
    )
    job.wait_for_step(3)
    victim = trainer_pid(job.output_dir, rank=1)
    killed = time.monotonic()
    os.kill(victim, 9)
    returncode = job.wait(timeout=120)
    seconds = time.monotonic() - killed
    print(f"{launcher}: the job ended {seconds:.1f} s after rank 1 was killed (sbatch exit {returncode})")
    log = job.log()
    assert returncode != 0, log
    assert seconds < 60, log
    assert not (job.output_dir / "checkpoints" / "step00005000").exists()
    assert re.search(r"srun exited [1-9]", log), log


def test_doctor_under_srun_sees_both_nodes(slurm_cluster):
    """The README's pre-flight check: `srun python -m launcher doctor` inside an allocation."""
    command = [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=2",
        f"--chdir={REPO}",
        sys.executable,
        "-m",
        "launcher",
        "doctor",
        "--timeout",
        "30",
    ]
    completed = subprocess.run(command, env=job_environment(), capture_output=True, text=True, timeout=120)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "doctor: rank 0/2 local_rank 0 source=slurm" in output, output
    assert "doctor: rank 1/2 local_rank 0 source=slurm" in output, output
    assert re.search(r"master=node1:\d+", output), output
    assert "2 rank(s) joined, all-reduce correct" in output, output


def test_a_rendered_script_runs(slurm_cluster, slurm_data, tmp_path):
    """performer slurm's output, submitted as it is: the config and overrides are baked in."""
    output_dir = tmp_path / "rendered"
    script = tmp_path / "rendered.sbatch"
    overrides = [*TEST_SETTINGS, f"data.manifest={slurm_data / 'train'}", f"train.output_dir={output_dir}"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "slurm",
            "configs/tiny.yaml",
            "--nodes",
            "2",
            "--tasks-per-node",
            "1",
            "--time",
            "00:05:00",
            "--chdir",
            str(REPO),
            "--out",
            str(script),
            "--set",
            *overrides,
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    job = submit(script, "rendered", tmp_path, slurm_data, arguments=[])
    assert_trained(job, job.wait())
