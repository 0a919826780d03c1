"""Planning epochs at scale: the O(shards) planner (data/plan.py) against the per-document planner it replaced.

    python benchmarks/data_plan.py [--sizes 1e6,1e7,1e8,1e9] [--repeats 3]

The data are synthetic split indexes, the index files alone (no tar files): N documents in N/1e4
shards of 10,000 documents, members of 1,000 documents, document lengths log-normal (mean ~400
tokens, sigma 1, clipped to [1, 65535]), a version-2 manifest that `Manifest.load` accepts (shard
paths, sizes and sha256 are fake; the index files' own sizes and sha256 are real). They are
generated chunk by chunk into runs/bench-plan/<size>/ and reused by later runs while valid. The
index files are read once before the measurements, so every process finds them in the page cache.

One rank's view, as `TokenStream` builds it (span corruption 512: rows of 568 tokens; batch 32 of
8 ranks, so a global batch is 256 rows; interleave_shards 32; seed 0). The tars are not read: a
stub reader fabricates each document's tokens (the shard's number mod 1000, + 10) at the length the
index gives, and `data.stream.read_rows` assembles the rows through the real `Source` and
`SplitOrder`. Each measurement runs in a fresh process (`common.run_isolated`), the median of
--repeats kept:

* start-up to first batch: `Manifest.load`, `manifest.split_index` (maps the index and checks it
  against the manifest, sha256 included: "index check"; sha256 alone is timed again afterwards),
  `Source.plan`, then rank 0's first batch (32 rows, their documents located and fabricated).
  Python's start and imports are not counted.
* memory: anonymous RSS (RssAnon, /proc/self/status) of the process after the first batch, after
  two more batches further on (the new planner: the first rows of windows 1 and 2), less before
  `Manifest.load`; the mapped index is file-backed and not in it. Also the peak of anonymous RSS
  over start-up (sampled every 2 ms by a helper process) and total RSS (VmRSS, index pages included).
* resume: a fresh process from nothing to rank 0's batch at row rows_per_epoch // 2 located and
  assembled (the index check included; also reported without it).
* epoch-boundary stall: in one process, the last global batch of epoch 0 (all 8 ranks' rows) is
  assembled, then rank 0's first batch of epoch 1 is timed; beside it, a mid-epoch batch of a
  window already built (median of 5) and a window's build alone.
* distinct shards per global batch: over 50 global batches spread evenly over epoch 0.

The baseline is the planner before commit f3b2414 (`EpochPlan`, `buffered_shuffle`, `plan_epoch`
and its `read_rows`, copied below from `git show f3b2414^:data/stream.py`): every document of the
epoch in one order, built by a per-document Python loop (a shuffle buffer of 1000 documents over
the permuted shards), fed the same memory-mapped lengths. Its resume and its epoch boundary re-plan
the whole epoch. It runs at 1e6 and 1e7; larger sizes only where an estimate extrapolated linearly
from the largest measured size says under --old-max-seconds (180) and --old-max-gb (12 GB of peak
anonymous memory), else the estimate is reported instead.

* start-up verification of the shards (their sizes, first headers and sha256, which the synthetic
  splits cannot show: no tars): on a real split (--verify-split, by default the 1 GB corpus
  `benchmarks/data_prepare.py` prepares; skipped if absent), the time one rank takes when it
  verifies every shard (a stream without peers) and when it verifies its 1/W share (the trainer's
  ranks, verdicts gathered), W = 2 and 8.

Targets (the issue's, at 1e9 documents): start-up to first batch < 10 s, anonymous memory < 256 MB,
resume < 10 s, epoch-boundary stall < 100 ms.

Writes benchmarks/results/data_plan.json and data_plan.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from data.shards import (  # noqa: E402
    INDEX_FILES,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    Manifest,
    ShardConfig,
    ShardInfo,
    sha256_file,
    write_json_atomically,
)
from data.stream import Source, StreamConfig, read_rows  # noqa: E402
from data.tokenizer import SpecialTokens  # noqa: E402

NAME = "data_plan"
CACHE = ROOT / "runs" / "bench-plan"
# A real split (tars) for the verification figures: the 1 GB corpus `benchmarks/data_prepare.py` prepares.
VERIFY_SPLIT = ROOT / "runs" / "bench-prepare" / "out" / "zst-w1" / "train"
DOCS_PER_SHARD = 10_000
DOCS_PER_MEMBER = 1_000
CHUNK_SHARDS = 1_000  # shards generated at a time (1e7 documents)
MEAN_TOKENS, SIGMA = 400.0, 1.0  # log-normal document lengths
GENERATOR = {"name": "benchmarks/data_plan.py", "layout": 1, "seed": 0, "mean_tokens": MEAN_TOKENS, "sigma": SIGMA}
SPECIAL = SpecialTokens(vocab_size=32_000, num_sentinels=100)
TOKEN_OFFSET = 10  # fabricated ids: shard % 1000 + 10, clear of the special ids

SEED, BATCH, WORLD, INTERLEAVE = 0, 32, 8, 32
RAW_LENGTH = StreamConfig(manifest="-").raw_length  # 568: span corruption at 512
GLOBAL_ROWS = BATCH * WORLD
DISTINCT_BATCHES = 50
TARGETS = {"startup_s": 10.0, "anon_mb": 256.0, "resume_s": 10.0, "stall_ms": 100.0}


def label(size: int) -> str:
    exponent = round(math.log10(size))
    return f"1e{exponent}" if 10**exponent == size else str(size)


# ------------------------------------------------------------------------------ synthetic splits


def _padded(nbytes: np.ndarray) -> np.ndarray:
    return (nbytes + 511) // 512 * 512


def _fake_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _valid(split: Path, documents: int) -> bool:
    """A generated split of this size by this generator, whole (the manifest is written last)."""
    try:
        manifest = Manifest.load(split)
    except Exception:
        return False
    if manifest.source.get("synthetic") != {**GENERATOR, "documents": documents}:
        return False
    return all(
        (split / e["path"]).is_file() and (split / e["path"]).stat().st_size == e["bytes"]
        for e in manifest.index.values()
    )


def generate_split(split: Path, documents: int) -> dict:
    """Write the synthetic split index of ``documents`` documents (module docstring) unless a valid
    one is there; memory stays at one chunk of CHUNK_SHARDS shards."""
    if _valid(split, documents):
        return {"generated": False}
    if documents % DOCS_PER_SHARD:
        raise SystemExit(f"--sizes: {documents} is not a multiple of {DOCS_PER_SHARD} documents")
    started = time.perf_counter()
    split.mkdir(parents=True, exist_ok=True)
    (split / MANIFEST_FILE).unlink(missing_ok=True)
    shards = documents // DOCS_PER_SHARD
    per_shard = DOCS_PER_SHARD // DOCS_PER_MEMBER
    members = shards * per_shard
    tmp = {name: split / (filename + ".tmp") for name, (filename, _, _) in INDEX_FILES.items()}
    lengths_file = np.lib.format.open_memmap(tmp["documents"], mode="w+", dtype="<u4", shape=(documents,))
    members_file = np.lib.format.open_memmap(tmp["members"], mode="w+", dtype="<i8", shape=(members, 3))
    shard_tokens = np.empty(shards, dtype=np.int64)
    shard_bytes = np.empty(shards, dtype=np.int64)
    rng = np.random.default_rng(GENERATOR["seed"])
    mu = math.log(MEAN_TOKENS) - SIGMA**2 / 2  # the log-normal's mean is exp(mu + sigma^2 / 2)
    for first in range(0, shards, CHUNK_SHARDS):
        count = min(CHUNK_SHARDS, shards - first)
        d0, d1 = first * DOCS_PER_SHARD, (first + count) * DOCS_PER_SHARD
        lengths = np.clip(np.rint(rng.lognormal(mu, SIGMA, d1 - d0)), 1, 65535).astype("<u4")
        lengths_file[d0:d1] = lengths
        # Member pairs as a packed tar holds them: lengths header + data, tokens header + data (uint16).
        member_tokens = lengths.reshape(-1, DOCS_PER_MEMBER).sum(axis=1, dtype=np.int64).reshape(count, per_shard)
        pair_bytes = 1024 + _padded(np.full_like(member_tokens, 4 * DOCS_PER_MEMBER)) + _padded(2 * member_tokens)
        offsets = np.cumsum(pair_bytes, axis=1) - pair_bytes + 1024 + _padded(np.int64(4 * DOCS_PER_MEMBER))
        m0, m1 = first * per_shard, (first + count) * per_shard
        members_file[m0:m1, 0] = np.arange(d0, d1, DOCS_PER_MEMBER)
        members_file[m0:m1, 1] = offsets.reshape(-1)
        members_file[m0:m1, 2] = rng.integers(0, 2**32, m1 - m0)
        shard_tokens[first : first + count] = member_tokens.sum(axis=1)
        shard_bytes[first : first + count] = (pair_bytes.sum(axis=1) + 1024 + 10239) // 10240 * 10240
    lengths_file.flush()
    members_file.flush()
    del lengths_file, members_file
    table = np.stack([np.arange(shards + 1) * DOCS_PER_SHARD, np.arange(shards + 1) * per_shard], axis=1)
    with open(tmp["shards"], "wb") as handle:
        np.save(handle, table.astype("<i8"), allow_pickle=False)
    index = {}
    for name, (filename, _, _) in INDEX_FILES.items():
        path = split / filename
        os.replace(tmp[name], path)
        index[name] = {"path": filename, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    infos = []
    for s in range(shards):
        path = f"train-{s:06d}.tar"
        infos.append(ShardInfo(path, DOCS_PER_SHARD, int(shard_tokens[s]), int(shard_bytes[s]), _fake_sha256(path)))
    manifest = Manifest(
        split="train",
        dtype="uint16",
        special=SPECIAL,
        tokenizer_fingerprint=None,
        shards=tuple(infos),
        writer={
            **ShardConfig().layout(),
            "tar_format": "ustar",
            "mtime": 0,
            "members": "<key>.lengths.u32 + <key>.tokens.u16",
        },
        source={"synthetic": {**GENERATOR, "documents": documents}},
        root=split,
        version=MANIFEST_VERSION,
        index=index,
    )
    write_json_atomically(split / MANIFEST_FILE, manifest.to_json())
    return {"generated": True, "seconds": round(time.perf_counter() - started, 1)}


def describe_split(split: Path) -> dict:
    manifest = Manifest.load(split)
    tokens = sum(s.tokens for s in manifest.shards)
    documents = sum(s.documents for s in manifest.shards)
    index_bytes = sum(e["bytes"] for e in manifest.index.values())
    return {
        "documents": documents,
        "shards": len(manifest.shards),
        "tokens": tokens,
        "tokens_per_document": round(tokens / documents, 1),
        "rows_per_epoch": (tokens + documents) // RAW_LENGTH,
        "index_bytes": index_bytes,
        "manifest_bytes": (split / MANIFEST_FILE).stat().st_size,
    }


def warm(split: Path) -> float:
    """Read the index files once, so that every measurement finds them in the page cache."""
    started = time.perf_counter()
    for filename, _, _ in INDEX_FILES.values():
        with open(split / filename, "rb") as handle:
            while handle.read(16 << 20):
                pass
    return time.perf_counter() - started


# ------------------------------------------------------------------------------- measuring tools


def memory() -> dict[str, int]:
    """This process's RssAnon, RssFile, VmRSS (bytes)."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                found[key] = int(value.split()[0]) * 1024
    return found


_SAMPLER = r"""
import select, sys
path = "/proc/%s/status" % sys.argv[1]
def anon():
    with open(path) as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0
peak = anon()
print(peak, flush=True)
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.002)
    try:
        peak = max(peak, anon())
    except OSError:
        break
    if ready:
        if not sys.stdin.readline():
            break
        print(peak, flush=True)
        peak = anon()
"""


class AnonPeak:
    """Peak anonymous RSS of this process between marks, sampled every 2 ms by a helper process (a
    thread would wait for the GIL that numpy holds through a long call)."""

    def __init__(self):
        command = [sys.executable, "-c", _SAMPLER, str(os.getpid())]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.process.stdout.readline()

    def mark(self) -> int:
        """The peak since the last mark (or the start)."""
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


class FabricatingReader:
    """What `read_rows` needs of a `ShardReader`, without tars: a document's tokens are the shard's
    number mod 1000 (+ TOKEN_OFFSET), at the length the index gives."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.documents = manifest.split_index.documents
        self.first = manifest.split_index.shards[:, 0]

    def read(self, shard: int, document: int) -> np.ndarray:
        length = int(self.documents[int(self.first[shard]) + document])
        return np.full(length, shard % 1000 + TOKEN_OFFSET, dtype=np.int64)


def check_batch(planner, epoch: int, first_row: int) -> None:
    """A batch holds eos and the fabricated ids of the shards located for its rows, nothing else
    (outside the timings)."""
    rows = planner.batch(epoch, first_row)
    assert rows.shape == (BATCH, RAW_LENGTH), rows.shape
    shards = planner.shards(epoch, first_row, BATCH)
    allowed = np.append(np.unique(shards % 1000 + TOKEN_OFFSET), SPECIAL.eos_id)
    assert np.isin(rows, allowed).all(), "rows hold ids of shards not located for them"


# ---------------------------------------------------------------------- the old planner (baseline)
# Copied from `git show f3b2414^:data/stream.py` (type annotations of `indices` and `config` loosened:
# the benchmark feeds objects with a `.lengths` and a namespace holding the old config's fields).


class EpochPlan:
    """Documents of one epoch in stream order, and where each starts in the packed token stream."""

    def __init__(self, shard, member, start, length, rows):
        self.shard, self.member, self.start, self.length, self.rows = shard, member, start, length, rows


def buffered_shuffle(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Order produced by a shuffle buffer of `buffer_size` over items 0..n-1 (webdataset-style):
    fill the buffer, emit a random slot, refill it with the next item. Displacement is bounded."""
    if buffer_size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    picks = rng.random(n)
    buffer = list(range(min(buffer_size, n)))
    upcoming = len(buffer)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        slot = int(picks[i] * len(buffer))
        out[i] = buffer[slot]
        if upcoming < n:
            buffer[slot] = upcoming
            upcoming += 1
        else:
            buffer[slot] = buffer[-1]
            buffer.pop()
    return out


def plan_epoch(indices: dict, epoch: int, config) -> EpochPlan:
    """The epoch's document order: a pure function of (config.seed, epoch) and the good shards."""
    rng = np.random.default_rng([config.seed, epoch, 0x5EED])
    positions = np.array(sorted(indices), dtype=np.int64)
    if config.shuffle_shards:
        positions = rng.permutation(positions)
    shard = np.concatenate([np.full(len(indices[p].lengths), p, dtype=np.int64) for p in positions])
    member = np.concatenate([np.arange(len(indices[p].lengths), dtype=np.int64) for p in positions])
    length = np.concatenate([np.asarray(indices[p].lengths, dtype=np.int64) for p in positions])
    order = buffered_shuffle(len(shard), config.shuffle_buffer, rng)
    shard, member, length = shard[order], member[order], length[order]
    start = np.concatenate(([0], np.cumsum(length + 1)[:-1])).astype(np.int64)  # +1: eos
    total = int(length.sum()) + len(length)
    return EpochPlan(shard=shard, member=member, start=start, length=length, rows=total // config.raw_length)


def old_read_rows(plan: EpochPlan, reader, first_row: int, num_rows: int, raw_length: int, eos_id: int) -> np.ndarray:
    """The old `read_rows` (its stand-in for unreadable documents left out: nothing fails here)."""
    begin, end = first_row * raw_length, (first_row + num_rows) * raw_length
    lo = int(np.searchsorted(plan.start, begin, side="right")) - 1
    hi = int(np.searchsorted(plan.start, end, side="left"))
    eos = np.array([eos_id], dtype=np.int64)
    pieces = []
    for d in range(lo, hi):
        pieces.append(reader.read(int(plan.shard[d]), int(plan.member[d])))
        pieces.append(eos)
    stream = np.concatenate(pieces)
    offset = begin - int(plan.start[lo])
    return stream[offset : offset + num_rows * raw_length].reshape(num_rows, raw_length)


OLD_CONFIG = SimpleNamespace(seed=SEED, shuffle_shards=True, shuffle_buffer=1000, raw_length=RAW_LENGTH)


# ------------------------------------------------------------------------------ the two planners


class NewPlanner:
    """The stream's own path: `Source.plan` (ShardSizes + SplitOrder over the mapped index)."""

    name = "new"

    def __init__(self, manifest: Manifest):
        config = StreamConfig(manifest=str(manifest.root), seed=SEED, batch_size=BATCH, interleave_shards=INTERLEAVE)
        self.source = Source(manifest, "train", 1.0, False)
        self.source.plan(config)
        self.order = self.source.order
        self.rows = self.order.rows
        self.reader = FabricatingReader(manifest)

    def batch(self, epoch: int, first_row: int) -> np.ndarray:
        return read_rows(self.source, self.reader, epoch, first_row, BATCH, RAW_LENGTH, SPECIAL.eos_id)

    def shards(self, epoch: int, first_row: int, rows: int) -> np.ndarray:
        """Distinct shards of the documents holding these rows."""
        begin, end = first_row * RAW_LENGTH, (first_row + rows) * RAW_LENGTH
        pieces = self.order.documents(epoch, begin, end)
        return np.unique(np.concatenate([window.shard[first:stop] for window, first, stop in pieces]))

    def further_rows(self) -> list[int]:
        """The first rows of windows 1 and 2 (building them)."""
        starts = self.order.layout(0).window_start
        return [int(starts[w]) // RAW_LENGTH + 1 for w in (1, 2) if w < len(starts) - 1]


class OldPlanner:
    """The planner before f3b2414: the whole epoch's order, per document."""

    name = "old"

    def __init__(self, manifest: Manifest):
        index = manifest.split_index
        firsts = index.shards[:, 0]
        self.indices = {
            p: SimpleNamespace(lengths=index.documents[firsts[p] : firsts[p + 1]]) for p in range(len(manifest.shards))
        }
        self.plans = {0: plan_epoch(self.indices, 0, OLD_CONFIG)}
        self.rows = self.plans[0].rows
        self.reader = FabricatingReader(manifest)

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self.plans:  # the old stream kept one epoch's plan: re-planned at each epoch
            self.plans[epoch] = plan_epoch(self.indices, epoch, OLD_CONFIG)
        return self.plans[epoch]

    def batch(self, epoch: int, first_row: int) -> np.ndarray:
        return old_read_rows(self.plan(epoch), self.reader, first_row, BATCH, RAW_LENGTH, SPECIAL.eos_id)

    def shards(self, epoch: int, first_row: int, rows: int) -> np.ndarray:
        plan = self.plan(epoch)
        begin, end = first_row * RAW_LENGTH, (first_row + rows) * RAW_LENGTH
        lo = int(np.searchsorted(plan.start, begin, side="right")) - 1
        hi = int(np.searchsorted(plan.start, end, side="left"))
        return np.unique(plan.shard[lo:hi])

    def further_rows(self) -> list[int]:
        return [self.rows // 3, 2 * self.rows // 3]


PLANNERS = {"new": NewPlanner, "old": OldPlanner}


def open_planner(kind: str, split: Path, timings: dict) -> tuple[Manifest, object]:
    """Manifest, checked index and planner, each step timed into ``timings``."""
    started = time.perf_counter()
    manifest = Manifest.load(split)
    timings["load_manifest_s"] = time.perf_counter() - started
    started = time.perf_counter()
    _ = manifest.split_index  # maps and checks the index (sha256 included)
    timings["index_check_s"] = time.perf_counter() - started
    started = time.perf_counter()
    planner = PLANNERS[kind](manifest)
    timings["plan_s"] = time.perf_counter() - started
    return manifest, planner


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# -------------------------------------------------------------------------------- the workers


def measure_startup(kind: str, split: Path) -> dict:
    peak = AnonPeak()
    before = memory()
    peak.mark()
    timings: dict = {}
    started = time.perf_counter()
    manifest, planner = open_planner(kind, split, timings)
    peaks = {"open": peak.mark()}
    timings["first_batch_s"] = timed(lambda: planner.batch(0, 0))
    timings["startup_s"] = time.perf_counter() - started
    peaks["first_batch"] = peak.mark()
    after_first = memory()
    further = planner.further_rows()
    timings["further_batches_s"] = timed(lambda: [planner.batch(0, row) for row in further])
    peaks["further"] = peak.mark()
    after_further = memory()
    peak.close()
    check_batch(planner, 0, 0)
    timings["sha256_s"] = timed(lambda: [sha256_file(split / f) for f, _, _ in INDEX_FILES.values()])
    anon0 = before["RssAnon"]
    return {
        **timings,
        "anon_before_bytes": anon0,
        "anon_first_batch_bytes": after_first["RssAnon"] - anon0,
        "anon_further_bytes": after_further["RssAnon"] - anon0,
        "anon_peak_startup_bytes": max(peaks["open"], peaks["first_batch"]) - anon0,
        "anon_peak_open_bytes": peaks["open"] - anon0,
        "anon_peak_bytes": max(peaks.values()) - anon0,
        "rss_first_batch_bytes": after_first["VmRSS"],
        "rss_further_bytes": after_further["VmRSS"],
        "file_rss_further_bytes": after_further["RssFile"],
        "further_rows": further,
        "rows_per_epoch": planner.rows,
    }


def measure_resume(kind: str, split: Path) -> dict:
    timings: dict = {}
    started = time.perf_counter()
    _, planner = open_planner(kind, split, timings)
    row = planner.rows // 2
    timings["locate_s"] = timed(lambda: planner.batch(0, row))
    timings["resume_s"] = time.perf_counter() - started
    timings["resume_after_index_s"] = timings["resume_s"] - timings["load_manifest_s"] - timings["index_check_s"]
    return {**timings, "row": row}


def measure_boundary(kind: str, split: Path, distinct: bool) -> dict:
    timings: dict = {}
    _, planner = open_planner(kind, split, timings)
    steps = planner.rows // GLOBAL_ROWS
    middle = steps // 2
    result: dict = {"steps_per_epoch": steps, **timings}
    # A mid-epoch batch: the first one builds its window (new planner), the next ones find it built.
    result["mid_first_batch_s"] = timed(lambda: planner.batch(0, middle * GLOBAL_ROWS))
    warm_times = [timed(lambda i=i: planner.batch(0, (middle + i) * GLOBAL_ROWS)) for i in range(1, 6)]
    result["mid_batch_s"] = statistics.median(warm_times)
    if kind == "new":
        order = planner.order
        built = {w for (e, w) in order._windows if e == 0}
        layout = order.layout(0)
        fresh = [w for w in range(layout.windows - 1) if w not in built][:3]  # not the last: it prepares epoch 1
        if fresh:
            result["window_build_s"] = statistics.median(timed(lambda w=w: order._build(layout, w)) for w in fresh)
    # The last global batch of epoch 0 (every rank's rows), then the first batch of epoch 1.
    last = (steps - 1) * GLOBAL_ROWS
    rank_times = [timed(lambda r=r: planner.batch(0, last + r * BATCH)) for r in range(WORLD)]
    result["last_batch_rank0_s"], result["last_global_batch_s"] = rank_times[0], sum(rank_times)
    if kind == "new":
        result["epoch1_prepared"] = (1, 0) in planner.order._windows
    result["stall_s"] = timed(lambda: planner.batch(1, 0))
    result["epoch1_other_ranks_max_s"] = max(timed(lambda r=r: planner.batch(1, r * BATCH)) for r in range(1, WORLD))
    check_batch(planner, 1, 0)
    check_batch(planner, 0, last)
    if distinct:
        picks = np.unique(np.linspace(0, steps - 1, DISTINCT_BATCHES).astype(np.int64))
        started = time.perf_counter()
        counts = [len(planner.shards(0, int(g) * GLOBAL_ROWS, GLOBAL_ROWS)) for g in picks]
        result["distinct_shards"] = {
            "batches": len(counts),
            "mean": float(np.mean(counts)),
            "min": int(min(counts)),
            "max": int(max(counts)),
            "seconds": time.perf_counter() - started,
        }
    return result


def worker(args) -> dict:
    split = Path(args.split)
    if args.task == "startup":
        return measure_startup(args.planner, split)
    if args.task == "resume":
        return measure_resume(args.planner, split)
    return measure_boundary(args.planner, split, args.distinct)


# ------------------------------------------------------------------------------------ the parent


def run(task: str, planner: str, split: Path, timeout_s: float, distinct: bool = False) -> dict:
    arguments = ["--task", task, "--planner", planner, "--split", str(split)] + (["--distinct"] if distinct else [])
    started = time.perf_counter()
    record = common.run_isolated(Path(__file__).resolve(), arguments, timeout_s)
    record["process_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps({"task": task, "planner": planner, "split": split.name, **record}), flush=True)
    return record


def median_record(records: list[dict], key: str) -> dict:
    """The run of median ``key``, with every run's ``key``; the first error if any run failed."""
    failed = [r for r in records if "error" in r]
    if failed:
        return failed[0]
    ranked = sorted(records, key=lambda r: r[key])
    middle = dict(ranked[len(ranked) // 2])
    middle[key + "_runs"] = [r[key] for r in records]
    return middle


def measure_planner(kind: str, split: Path, repeats: int, timeout_s: float) -> dict:
    startup = median_record([run("startup", kind, split, timeout_s) for _ in range(repeats)], "startup_s")
    resume = median_record([run("resume", kind, split, timeout_s) for _ in range(repeats)], "resume_s")
    boundaries = [run("boundary", kind, split, timeout_s, distinct=i == 0) for i in range(repeats)]
    boundary = median_record(boundaries, "stall_s")
    if "distinct_shards" in boundaries[0]:
        boundary["distinct_shards"] = boundaries[0]["distinct_shards"]
    return {"run": True, "startup": startup, "resume": resume, "boundary": boundary}


def old_estimate(measured: dict[int, dict], size: int) -> dict | None:
    """The old planner at ``size``, extrapolated linearly (per document) from the largest size it ran at."""
    done = {n: r for n, r in measured.items() if r.get("run") and "error" not in r["startup"]}
    if not done:
        return None
    base = max(done)
    scale = size / base
    startup = done[base]["startup"]
    return {
        "from_size": base,
        "startup_s": startup["startup_s"] * scale,
        "plan_s": startup["plan_s"] * scale,
        "anon_peak_bytes": startup["anon_peak_bytes"] * scale,
        "anon_first_batch_bytes": startup["anon_first_batch_bytes"] * scale,
    }


def summarise(entry: dict) -> dict:
    """The table's figures for one planner at one size (None where not measured)."""
    if not entry.get("run"):
        return {}
    s, r, b = entry["startup"], entry["resume"], entry["boundary"]
    error = next((x["error"] for x in (s, r, b) if "error" in x), None)
    return {
        "startup_s": s.get("startup_s"),
        "index_check_s": s.get("index_check_s"),
        "sha256_s": s.get("sha256_s"),
        "anon_mb": None
        if "anon_further_bytes" not in s
        else max(s["anon_first_batch_bytes"], s["anon_further_bytes"]) / 1e6,
        "anon_peak_mb": None if "anon_peak_bytes" not in s else s["anon_peak_bytes"] / 1e6,
        "rss_mb": None if "rss_further_bytes" not in s else s["rss_further_bytes"] / 1e6,
        "resume_s": r.get("resume_s"),
        "stall_ms": None if "stall_s" not in b else b["stall_s"] * 1e3,
        "mid_batch_ms": None if "mid_batch_s" not in b else b["mid_batch_s"] * 1e3,
        "distinct_mean": b.get("distinct_shards", {}).get("mean"),
        "distinct_min": b.get("distinct_shards", {}).get("min"),
        "error": error,
    }


def measure_verification(split: Path, ranks: tuple[int, ...] = (1, 2, 8)) -> dict:
    """Start-up verification of a real split (tars, sha256 on), as one rank does it: every shard
    (a stream without peers) against the share of rank 0 of W (positions 0, W, 2W, ...), each
    timed after one untimed pass so that the files are in the page cache (hashing, not the disk)."""
    from data.shards import verify_manifest

    manifest = Manifest.load(split)
    verify_manifest(manifest, check_sha256=True, full=False)  # warm the page cache
    shards = len(manifest.shards)
    out = {"split": str(split.relative_to(ROOT)) if split.is_relative_to(ROOT) else split.name, "shards": shards}
    out["bytes"] = sum(s.bytes for s in manifest.shards)
    out["per_rank"] = []
    for world in ranks:
        positions = range(0, shards, world)
        seconds = statistics.median(
            timed(lambda: verify_manifest(manifest, check_sha256=True, full=False, positions=positions))
            for _ in range(3)
        )
        out["per_rank"].append({"world_size": world, "shards_verified": len(positions), "seconds": seconds})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=("startup", "resume", "boundary"), help=argparse.SUPPRESS)
    parser.add_argument("--planner", choices=tuple(PLANNERS), help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    parser.add_argument("--distinct", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1e6,1e7,1e8,1e9", help="documents per synthetic split (10,000 per shard)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per measurement of the new planner (median)")
    parser.add_argument("--old-repeats", type=int, default=1, help="processes per measurement of the old planner")
    parser.add_argument("--old-always", type=float, default=1e7, help="the old planner runs at sizes up to this")
    parser.add_argument("--old-max-seconds", type=float, default=180.0, help="larger sizes: estimated plan time limit")
    parser.add_argument(
        "--old-max-gb", type=float, default=12.0, help="larger sizes: estimated peak anonymous GB limit"
    )
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per measurement process")
    parser.add_argument(
        "--verify-split",
        default=str(VERIFY_SPLIT),
        help="a real prepared split whose start-up verification is timed per rank (skipped if missing)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    sizes = sorted(int(float(s)) for s in args.sizes.split(","))
    results: dict = {
        "machine": common.machine(),
        "settings": {
            "sizes": sizes,
            "repeats": args.repeats,
            "old_repeats": args.old_repeats,
            "documents_per_shard": DOCS_PER_SHARD,
            "documents_per_member": DOCS_PER_MEMBER,
            "length_distribution": f"log-normal, mean {MEAN_TOKENS:g} tokens, sigma {SIGMA:g}, clipped to [1, 65535]",
            "raw_length": RAW_LENGTH,
            "batch_size": BATCH,
            "world_size": WORLD,
            "interleave_shards": INTERLEAVE,
            "seed": SEED,
            "old_shuffle_buffer": OLD_CONFIG.shuffle_buffer,
            "old_limits": {"seconds": args.old_max_seconds, "peak_anon_gb": args.old_max_gb},
        },
        "targets": TARGETS,
        "sizes": [],
    }
    old_measured: dict[int, dict] = {}
    for size in sizes:
        split = CACHE / label(size)
        generation = generate_split(split, size)
        entry = {"size": size, "label": label(size), "split": describe_split(split), "generation": generation}
        entry["warm_read_s"] = round(warm(split), 2)
        print(json.dumps({k: entry[k] for k in ("label", "split", "generation")}), flush=True)
        entry["new"] = measure_planner("new", split, args.repeats, args.timeout_s)
        estimate = old_estimate(old_measured, size)
        if size <= args.old_always or (
            estimate is not None
            and estimate["startup_s"] < args.old_max_seconds
            and estimate["anon_peak_bytes"] < args.old_max_gb * 1e9
        ):
            entry["old"] = measure_planner("old", split, args.old_repeats, args.timeout_s)
            old_measured[size] = entry["old"]
        else:
            entry["old"] = {"run": False, "estimate": estimate}
        entry["summary"] = {"new": summarise(entry["new"]), "old": summarise(entry["old"])}
        results["sizes"].append(entry)
    verify_split = Path(args.verify_split)
    if (verify_split / MANIFEST_FILE).is_file():
        results["verification"] = measure_verification(verify_split)
    common.publish(NAME, results, markdown(results))
    return 0


# ------------------------------------------------------------------------------------ the report


def _s(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


def _pair(new: float | None, old: float | None, fmt=_s, estimate: str | None = None) -> str:
    """ "new / old (old/new x)"; where old did not run, "new / not run (est. ...)" (estimate "": no
    estimate; None: old not measured for another reason)."""
    if old is None:
        return f"{fmt(new)} / " + ("-" if estimate is None else f"not run (est. {estimate})" if estimate else "not run")
    ratio = f" ({old / new:,.0f}x)" if new and old / new >= 2 else ""
    return f"{fmt(new)} / {fmt(old)}{ratio}"


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}" if value < 100 else f"{value:,.0f}")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def comparison_table(results: dict) -> str:
    """One row per size: the new planner's figures / the old planner's."""
    rows = []
    for entry in results["sizes"]:
        new, old = entry["summary"]["new"], entry["summary"]["old"]
        estimate = entry["old"].get("estimate")
        est_time = est_mem = None
        if not entry["old"].get("run"):
            est_time = f"~{estimate['startup_s']:,.0f} s" if estimate else "none"
            est_mem = f"~{estimate['anon_peak_bytes'] / 1e9:,.1f} GB peak" if estimate else "none"
        distinct_new = (
            "-" if new.get("distinct_mean") is None else f"{new['distinct_mean']:.1f} (min {new['distinct_min']})"
        )
        distinct_old = (
            ("not run" if not entry["old"].get("run") else "-")
            if old.get("distinct_mean") is None
            else f"{old['distinct_mean']:.1f} (min {old['distinct_min']})"
        )
        rows.append(
            [
                entry["label"],
                f"{entry['split']['shards']:,}",
                _pair(new.get("startup_s"), old.get("startup_s"), estimate=est_time),
                _pair(new.get("index_check_s"), old.get("index_check_s"), estimate="" if est_time else None),
                _pair(new.get("anon_mb"), old.get("anon_mb"), _mb, estimate=est_mem),
                _pair(new.get("resume_s"), old.get("resume_s"), estimate=est_time),
                _pair(new.get("stall_ms"), old.get("stall_ms"), _ms, estimate=est_time),
                f"{distinct_new} / {distinct_old}",
            ]
        )
    return (
        common.table(
            [
                "documents",
                "shards",
                "start-up to first batch (s)",
                "of which index check (s)",
                "anon. memory (MB)",
                "resume mid-epoch (s)",
                "epoch-boundary stall (ms)",
                "distinct shards / global batch",
            ],
            rows,
            align="lrrrrrrr",
        )
    ).rstrip("\n")


def verification_table(results: dict) -> str:
    """Start-up verification of a real split by one rank, alone and as 1/W of the ranks."""
    verification = results["verification"]
    every = verification["per_rank"][0]["seconds"]
    lines = [
        f"Start-up verification of a real split ({verification['split']}: {verification['shards']} shards, "
        f"{verification['bytes'] / 1e9:.2f} GB; size, first header and sha256 of each, page cache warm), as one "
        "rank does it:",
        "",
        "| ranks | shards this rank verifies | seconds | vs every rank verifying every shard |",
        "|---:|---:|---:|---:|",
    ]
    for row in verification["per_rank"]:
        lines.append(
            f"| {row['world_size']} | {row['shards_verified']} | {row['seconds']:.2f} | {every / row['seconds']:.1f}x |"
        )
    return "\n".join(lines)


def markdown(results: dict) -> str:
    machine, settings = results["machine"], results["settings"]
    lines = [
        "# Planning epochs at scale: O(shards) planner vs the per-document planner",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, Python {machine['python']}; "
        f"load average {machine['load_average_1m']:.2f} at the start. Commit {machine['commit']}"
        f"{' (dirty)' if machine['dirty'] else ''}. Command: `{machine['command']}`.",
        "",
        f"Synthetic split indexes (no tars): {settings['documents_per_shard']:,} documents per shard, members of "
        f"{settings['documents_per_member']:,}, lengths {settings['length_distribution']}. One rank of "
        f"{settings['world_size']}, batch {settings['batch_size']} rows of {settings['raw_length']} tokens "
        f"(global batch {settings['world_size'] * settings['batch_size']} rows), interleave_shards "
        f"{settings['interleave_shards']}; old planner: shuffle buffer {settings['old_shuffle_buffer']} documents. "
        "Index files in the page cache. Each cell is new / old (old over new where 2x or more); new: median of "
        f"{settings['repeats']} processes, old: {settings['old_repeats']}.",
        "",
    ]
    lines += [
        comparison_table(results),
        "",
        "Targets (new planner):",
        "",
    ]
    labels = [entry["label"] for entry in results["sizes"]]
    target_rows = []
    for key, name, fmt, unit in (
        ("startup_s", "start-up to first batch", _s, "s"),
        ("anon_mb", "anonymous memory after the first batches", _mb, "MB"),
        ("anon_peak_mb", "peak anonymous memory (transient, same bound)", _mb, "MB"),
        ("resume_s", "resume to mid-epoch", _s, "s"),
        ("stall_ms", "epoch-boundary stall", _ms, "ms"),
    ):
        cells = []
        for entry in results["sizes"]:
            value = entry["summary"]["new"].get(key)
            bound = TARGETS[key.replace("_peak", "")]
            cells.append("-" if value is None else f"{fmt(value)} {'met' if value < bound else '**missed**'}")
        target_rows.append([name, f"< {TARGETS[key.replace('_peak', '')]:g} {unit}", *cells])
    lines += [common.table(["", "target", *labels], target_rows, align="ll" + "r" * len(labels)).rstrip("\n"), ""]
    detail = []
    for entry in results["sizes"]:
        for kind in ("new", "old"):
            if not entry[kind].get("run"):
                continue
            s, b, summary = entry[kind]["startup"], entry[kind]["boundary"], entry["summary"][kind]
            if "error" in s or "error" in b:
                detail.append([entry["label"], kind, summary.get("error") or "error", *["-"] * 8])
                continue
            detail.append(
                [
                    entry["label"],
                    kind,
                    _s(s["load_manifest_s"]),
                    f"{_s(s['index_check_s'])} ({_s(s['sha256_s'])})",
                    _s(s["plan_s"]),
                    _ms(s["first_batch_s"] * 1e3),
                    _mb(summary["anon_peak_mb"]),
                    _mb(summary["rss_mb"]),
                    _ms(b["mid_batch_s"] * 1e3),
                    "-" if "window_build_s" not in b else _ms(b["window_build_s"] * 1e3),
                    _ms(b["last_batch_rank0_s"] * 1e3),
                ]
            )
    lines += [
        "Start-up in parts, memory beyond the table, batch times:",
        "",
        common.table(
            [
                "documents",
                "planner",
                "load manifest (s)",
                "index check (s) (sha256 alone)",
                "plan (s)",
                "first batch (ms)",
                "peak anon. (MB)",
                "total RSS (MB)",
                "mid-epoch batch (ms)",
                "window build (ms)",
                "last batch of epoch, rank 0 (ms)",
            ],
            detail,
            align="ll" + "r" * 9,
        ).rstrip("\n"),
        "",
        "- anon. memory: RssAnon growth from before `Manifest.load` to after the first batch and two more (new: "
        "the first rows of windows 1 and 2; old: rows at 1/3 and 2/3 of the epoch), the larger of the two; peak "
        "anon.: the highest RssAnon during start-up and those batches (sampled every 2 ms), over the same base. "
        "Total RSS includes the pages of the mapped index that were touched.",
        "- resume: a fresh process from nothing to rank 0's batch at row rows_per_epoch // 2; the old planner "
        "plans the whole epoch first. Epoch-boundary stall: rank 0's first batch of epoch 1 right after the last "
        "global batch of epoch 0 (the new planner built epoch 1's first window with epoch 0's last; the old "
        "planner plans epoch 1 whole). Mid-epoch batch: a batch in a window already built; window build: one "
        "window's order alone, what a batch pays where it enters a window nobody prepared.",
        "- Distinct shards: the shards of an epoch are spread evenly over its windows (at most interleave_shards "
        "each); a global batch draws from the window it lies in (two at a window boundary).",
    ]
    if results.get("verification"):
        lines += ["", verification_table(results)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
