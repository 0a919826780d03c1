"""The peer-abort watchdog against a real TCPStore: a blocking wait, not polling.

A child process stands for a rank (its watchdog on a client of the test's store server); the test
posts the abort flag, arms the rank through its stdin, or takes the server away, and watches the
child end (or not) with the watchdog's exit code and message.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as torch_dist
from jobs import REPO

from launcher.dist import ABORT_KEY, free_port

RANK = textwrap.dedent(
    """
    import datetime, sys, time
    import torch.distributed as torch_dist
    from launcher.dist import PeerAbortWatchdog

    port = int(sys.argv[1])
    store = torch_dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=10))
    watchdog = PeerAbortWatchdog(rank=1, timeout_s=10, exit_code=7, poll_s=0.05, store=store)
    assert watchdog.connected.wait(10)  # (its client connects on its thread)
    print("ready", flush=True)
    for line in sys.stdin:  # "arm" arms step 3, "disarm" disarms
        if line.strip() == "arm":
            watchdog.arm(3)
        else:
            watchdog.disarm()
        print(line.strip(), flush=True)
    time.sleep(60)
    """
)


def start_rank(port: int) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", RANK, str(port)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    return child


def tell(child: subprocess.Popen, command: str) -> None:
    child.stdin.write(command + "\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == command


def ended_within(child: subprocess.Popen, seconds: float) -> int | None:
    try:
        return child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture
def server():
    port = free_port()
    store = torch_dist.TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=10), wait_for_workers=False)
    return port, store


def test_an_abort_ends_an_armed_rank_at_once_and_a_disarmed_one_only_when_it_arms(server):
    port, store = server
    child = start_rank(port)
    try:
        store.set(ABORT_KEY, "rank 0: a collective waited longer than dist.timeout_s=10 s for another rank")
        assert ended_within(child, 1.0) is None  # between steps: the loop decides for itself
        posted = time.monotonic()
        child.stdin.write("arm\n")
        child.stdin.flush()
        assert ended_within(child, 5.0) == 7
        assert time.monotonic() - posted < 2.0
        message = child.stderr.read()
        assert "[rank 1] error: the job is over (rank 0: a collective waited" in message
        assert "while this rank was still inside step 3" in message
    finally:
        child.kill()


def test_a_rank_is_not_ended_by_its_own_abort(server):
    port, store = server
    child = start_rank(port)
    try:
        tell(child, "arm")
        store.set(ABORT_KEY, "rank 1: RuntimeError")  # posted by this rank itself: it reports on its own
        assert ended_within(child, 1.5) is None
    finally:
        child.kill()


def test_an_armed_rank_ends_when_the_store_goes_away():
    port = free_port()
    host = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import datetime, sys, time, torch.distributed as d; "
            "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), None, True, datetime.timedelta(seconds=10), "
            "wait_for_workers=False); print('up', flush=True); time.sleep(60)",
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert host.stdout.readline().strip() == "up"
    child = start_rank(port)
    try:
        tell(child, "arm")
        host.kill()  # rank 0, which hosts the store, is gone
        assert ended_within(child, 5.0) == 7
        assert "rank 0, which hosts the rendezvous store, is gone" in child.stderr.read()
    finally:
        child.kill()
        host.kill()
