"""Rank 0's rendezvous store under N ranks: the peer-abort watchdog polling it, and waiting on it.

    python benchmarks/store_load.py [--ranks 64,256,1024] [--seconds 10]

Every rank of a job holds a client of one `torch.distributed.TCPStore`, served by rank 0 (libuv
backend). Here N simulated ranks (threads, 128 per process, each with its own clients, as real
ranks have) do what the trainer's ranks do against a real TCPStore server in a process of its own:
they rendezvous (an `add` each, then a wait for the go), run the peer-abort watchdog for
--seconds, and then one rank posts the abort flag. Two watchdogs:

* poll: the one before this change: every 0.5 s each rank asks whether the flag is set (`check`);
* wait: the one now in `launcher.dist.PeerAbortWatchdog`: one blocking `wait` per rank on a client
  of its own, answered by the server when the flag is set.

Measured while the watchdogs run: the requests per second reaching the server (counted by the
clients), the server process's CPU (its /proc stat; the share of one core), and the latency a real
store operation sees meanwhile (a set and a get by another client every 10 ms: median and 99th
percentile); then the time from the abort until the last rank noticed it, and the rendezvous time.
The rendezvous time runs from the last simulated rank's start (its process's imports done) to
the last arrival: each rank's connection and its `add`. The waiting watchdog's second connection
per rank comes after, on its own thread (as in the trainer), and is timed apart: from the go to the
last watchdog connected, before the watched seconds begin.
All processes share this machine's cores, so the server's CPU and the latencies include the
clients' contention: compare the two watchdogs at the same N.

Writes benchmarks/results/store_load.json and store_load.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch.distributed as torch_dist  # noqa: E402

from benchmarks import common  # noqa: E402
from launcher.dist import ABORT_KEY, free_port  # noqa: E402

NAME = "store_load"
THREADS_PER_PROCESS = 128
POLL_S = 0.5  # the polling watchdog's interval before this change
TIMEOUT = datetime.timedelta(seconds=300)


def client(port: int) -> torch_dist.TCPStore:
    return torch_dist.TCPStore("127.0.0.1", port, None, False, TIMEOUT, wait_for_workers=False)


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ------------------------------------------------------------------------------- child processes


def serve(port: int) -> None:
    """The store's server, alone in its process (rank 0's store thread), until stdin closes."""
    _raise_open_files_limit()
    store = torch_dist.TCPStore("127.0.0.1", port, None, True, TIMEOUT, wait_for_workers=False)
    print("up", flush=True)
    sys.stdin.read()
    del store


def ranks(port: int, count: int, mode: str) -> None:
    """`count` simulated ranks in threads; prints one JSON line: each rank's requests and when it
    noticed the abort."""
    _raise_open_files_limit()
    results = [None] * count

    def rank(i: int) -> None:
        started_at = time.time()
        store = client(port)
        store.add("rendezvous/arrived", 1)
        store.wait(["rendezvous/go"])
        # The watchdog's client of its own connects on the watchdog's thread once training starts,
        # after the rendezvous (as launcher.dist.PeerAbortWatchdog does); measured apart.
        own = client(port) if mode == "wait" else None
        store.add("watchdog/connected", 1)
        requests = 0
        if mode == "poll":
            while True:
                time.sleep(POLL_S)
                requests += 1
                if store.check([ABORT_KEY]):
                    break
        else:
            requests += 1
            own.wait([ABORT_KEY], TIMEOUT)
        results[i] = {"requests": requests, "noticed_at": time.time(), "started_at": started_at}

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results), flush=True)


# ------------------------------------------------------------------------------------ the parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe_latencies(store: torch_dist.TCPStore, until: float) -> list[float]:
    """Seconds per set + get round trip, every 10 ms until ``until``."""
    latencies = []
    while time.monotonic() < until:
        started = time.perf_counter()
        store.set("probe", "x")
        store.get("probe")
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    return latencies


def measure(count: int, mode: str, seconds: float) -> dict:
    port = free_port()
    here = [sys.executable, __file__]
    server = subprocess.Popen([*here, "--serve", str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "up"
    parent = client(port)
    processes = math.ceil(count / THREADS_PER_PROCESS)
    sizes = [count // processes + (i < count % processes) for i in range(processes)]
    children = [
        subprocess.Popen([*here, "--ranks-of", str(port), str(size), mode], stdout=subprocess.PIPE, text=True)
        for size in sizes
    ]
    try:
        while parent.add("rendezvous/arrived", 0) < count:
            time.sleep(0.01)
        arrived_at = time.time()
        parent.set("rendezvous/go", "1")
        while parent.add("watchdog/connected", 0) < count:
            time.sleep(0.01)
        connected_at = time.time()
        time.sleep(1.0)  # every rank in its watchdog loop
        cpu_before, window_started = cpu_seconds(server.pid), time.monotonic()
        latencies = probe_latencies(parent, window_started + seconds)
        window = time.monotonic() - window_started
        server_cpu = (cpu_seconds(server.pid) - cpu_before) / window
        aborted_at = time.time()
        parent.set(ABORT_KEY, "rank 0: benchmark")
        reports = [json.loads(child.communicate(timeout=300)[0]) for child in children]
    finally:
        for child in children:
            child.kill()
        server.stdin.close()
        server.wait(timeout=30)
    ranks_reports = [r for report in reports for r in report]
    requests = sum(r["requests"] for r in ranks_reports)
    watched = window + 1.0 + (max(r["noticed_at"] for r in ranks_reports) - aborted_at)
    latencies.sort()
    return {
        "ranks": count,
        "watchdog": mode,
        "client_processes": processes,
        # From the last rank's start (its process's imports done) to the last arrival: connections + add.
        "rendezvous_s": arrived_at - max(r["started_at"] for r in ranks_reports),
        # From the go to the last watchdog connected (the waiting one's second connection per rank).
        "watchdog_connected_s": connected_at - arrived_at,
        "watchdog_requests_per_s": requests / watched,
        "server_cpu_share_of_a_core": server_cpu,
        "probe_round_trips": len(latencies),
        "probe_latency_median_ms": statistics.median(latencies) * 1e3,
        "probe_latency_p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3,
        "abort_noticed_by_all_after_ms": (max(r["noticed_at"] for r in ranks_reports) - aborted_at) * 1e3,
    }


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Rank 0's rendezvous store under N ranks: the watchdog polling it, and waiting on it",
        "",
        f"Machine: {machine['cpu_count']} CPUs ({machine.get('cpu_model', 'CPU')}), server and simulated ranks "
        f"on the same cores; {results['settings']['seconds']:g} s of watchdog per row. Commit {machine['commit']}. "
        f"Command: `{machine['command']}`.",
        "",
        table(results),
        "",
        "- poll: every rank checks the abort flag every 0.5 s (the watchdog before this change); wait: one "
        "blocking wait per rank on a client of its own, answered when the flag is set (the watchdog now).",
        "- requests/s: the watchdog's requests reaching rank 0's store; CPU: the store process's, as a share of "
        "one core; a store operation: a set and a get by another client every 10 ms while the watchdogs run.",
    ]
    return "\n".join(lines) + "\n"


def table(results: dict) -> str:
    rows = [
        [
            f"{r['ranks']:,}",
            r["watchdog"],
            f"{r['watchdog_requests_per_s']:,.1f}",
            f"{r['server_cpu_share_of_a_core'] * 100:.1f}%",
            f"{r['probe_latency_median_ms']:.2f} / {r['probe_latency_p99_ms']:.2f}",
            f"{r['abort_noticed_by_all_after_ms']:,.0f}",
            f"{r['rendezvous_s']:.2f}",
            f"{r['watchdog_connected_s']:.2f}" if "watchdog_connected_s" in r else "-",
        ]
        for r in results["records"]
    ]
    header = [
        "ranks",
        "watchdog",
        "requests/s at rank 0",
        "rank 0 store CPU",
        "a store operation, median / p99 (ms)",
        "abort noticed by all after (ms)",
        "rendezvous (s)",
        "watchdogs connected after (s)",
    ]
    return common.table(header, rows, align="lrrrrrrr").rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="64,256,1024", help="simulated ranks, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="watchdog time measured per row")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ranks-of", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.ranks_of:
        port, count, mode = args.ranks_of
        ranks(int(port), int(count), mode)
        return 0
    _raise_open_files_limit()
    records = []
    for count in (int(n) for n in args.ranks.split(",")):
        for mode in ("poll", "wait"):
            record = measure(count, mode, args.seconds)
            print(json.dumps(record), flush=True)
            records.append(record)
    results = {"machine": common.machine(), "settings": {"seconds": args.seconds, "poll_s": POLL_S}, "records": records}
    common.publish(NAME, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
