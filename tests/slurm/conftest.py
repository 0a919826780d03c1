"""A real Slurm for these tests: slurm/local-cluster/start.sh (two emulated nodes on this host)
with its state under a temporary directory, stopped at the end of the session.

It needs root and Debian's slurmctld/slurmd/munge (installed by start.sh with apt-get when
missing); where that cannot be, the job tests skip and say why. Anywhere it can (CI), they run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "launcher"))  # jobs.py: TEST_SETTINGS, prepare_data
from jobs import prepare_data  # noqa: E402

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _installed(package: str) -> bool:
    query = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return query.returncode == 0 and "ok installed" in query.stdout


def why_no_slurm() -> str | None:
    """Why a local cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (it installs packages and starts slurmctld/slurmd/munged)"
    if shutil.which("dpkg-query") is None:
        return "the local Slurm cluster needs Debian packages (no dpkg on this machine)"
    if all(_installed(p) for p in PACKAGES):
        return None
    if shutil.which("apt-get") is None:
        return f"no apt-get to install {', '.join(PACKAGES)}"
    policy = subprocess.run(["apt-cache", "policy", *PACKAGES], capture_output=True, text=True).stdout
    if "Candidate: (none)" in policy or policy.count("Candidate:") < len(PACKAGES):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        policy = subprocess.run(["apt-cache", "policy", *PACKAGES], capture_output=True, text=True).stdout
        if "Candidate: (none)" in policy or policy.count("Candidate:") < len(PACKAGES):
            return f"the package sources offer no {', '.join(PACKAGES)}"
    return None


def _free_port_block(count: int) -> int:
    """A base port with base..base+count-1 all free (slurmctld, then one slurmd per node)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65000:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports for the local Slurm cluster")


@dataclass(frozen=True)
class Cluster:
    root: Path
    conf: Path
    start_s: float


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = why_no_slurm()
    if reason is not None:
        pytest.skip(f"Slurm tests skipped: {reason}")

    root = tmp_path_factory.mktemp("slurm")
    environment = {
        **os.environ,
        "LOCAL_SLURM_ROOT": str(root),
        "LOCAL_SLURM_NODES": "2",
        "LOCAL_SLURM_PORT": str(_free_port_block(3)),
        "LOCAL_SLURM_LINK": "0",
    }
    started = time.monotonic()
    start = subprocess.run(
        [str(REPO / "slurm" / "local-cluster" / "start.sh")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    start_s = time.monotonic() - started
    stop = [str(REPO / "slurm" / "local-cluster" / "stop.sh")]
    if start.returncode != 0:
        subprocess.run(stop, env=environment, capture_output=True, timeout=120)
        pytest.fail(f"the local Slurm cluster did not start:\n{start.stdout}\n{start.stderr}")
    conf = root / "slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield Cluster(root=root, conf=conf, start_s=start_s)
    finally:
        subprocess.run(stop, env=environment, capture_output=True, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory, slurm_cluster):
    """The small real corpus of tests/launcher/jobs.py (shards + tokenizer), once per session."""
    return prepare_data(tmp_path_factory.mktemp("slurm-data"))
