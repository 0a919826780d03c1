"""Fixtures for the reliability tests: the multi-process harness of tests/launcher (jobs.py), real
data and a real trained run, each built once per session; a test that damages one copies it first."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "launcher"))  # jobs.py: TEST_SETTINGS, prepare_data, run_pretrain
from jobs import BIN, prepare_data, run_pretrain  # noqa: E402


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small real corpus: stdlib subset -> SentencePiece (vocab 1000) -> train/heldout shards."""
    return prepare_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def sharded_data(prepared_data, tmp_path_factory) -> Path:
    """The same corpus with its training split in 9 shards of 8 documents: room to lose a few."""
    out = tmp_path_factory.mktemp("sharded") / "data"
    shutil.copytree(prepared_data, out)
    shutil.rmtree(out / "train")
    command = [
        str(BIN / "performer"),
        "data",
        "shards",
        "--tokenizer",
        str(out / "tokenizer"),
        "--out",
        str(out / "train"),
        "--split",
        "train",
        "--source",
        "stdlib",
        "--max-documents",
        "80",
        "--heldout-fraction",
        "0.15",
        "--max-samples-per-shard",
        "8",
        "--workers",
        "1",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    return out


@pytest.fixture
def data_copy(sharded_data, tmp_path) -> Path:
    """A private copy of `sharded_data` to damage."""
    return Path(shutil.copytree(sharded_data, tmp_path / "data"))


@pytest.fixture(scope="session")
def trained_run(prepared_data, tmp_path_factory) -> Path:
    """One process, 4 steps, checkpoints at steps 2 and 4 (ZeRO-0 fp32): a healthy run directory."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run = run_pretrain(
        prepared_data, out, "train.max_steps=4", "checkpoint.interval=2", "eval.interval=0", "zero.stage=0", ranks=1
    )
    assert run.returncode == 0, run.output[-4000:]
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of `trained_run` to damage (its config still points at the shared data)."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
