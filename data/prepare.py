"""`performer data prepare`: a corpus to a tokenizer and train/held-out packed shards, in parallel
and resumable.

    OUT/tokenizer/        trained on a seeded sample of the corpus (or a copy of --tokenizer DIR)
    OUT/train/            <split>-pNNNNN-NNNNNN.tar shards, their index, manifest.json (written last)
    OUT/heldout/
    OUT/.prepare/         the state: plan.json (the settings being prepared) and, per finished
                          part, part-NNNNN.json plus its index arrays

The corpus's work units (files, Parquet row groups, Arrow files: `data.sources`) are grouped in
plan order into parts of about `part_bytes` of input. The grouping depends on the corpus alone,
so the bytes written do not depend on `--workers`: each worker process takes whole parts, reads
each document once, sends it to the train or held-out writer by its content hash
(`data.corpus.split_of`), and writes its own shards, hashed as they are closed. A part is done
when its record is renamed into place; the split manifests are written last, from the records in
part order. An interrupted prepare (Ctrl-C, kill -9) run again with the same command reuses the
finished parts (those whose files are unchanged), redoes the others, and ends byte-identical to
an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from data.corpus import CorpusConfig, plan, split_of
from data.errors import DataError
from data.shards import (
    INDEX_FILES,
    Manifest,
    Part,
    PartWriter,
    ShardConfig,
    ShardInfo,
    finish_split,
    save_array_atomically,
    write_json_atomically,
)
from data.sources import Skipped, WorkUnit, read_unit
from data.tokenizer import TOKENIZER_DIR, Tokenizer, TokenizerConfig, train_tokenizer
from performer import strict

STATE_DIR = ".prepare"
SPLITS = ("train", "heldout")
# Input bytes per part: a 64th of the corpus, within these bounds (enough parts to spread over
# workers, parts large enough for full shards); a function of the corpus, never of --workers.
MIN_PART_BYTES, MAX_PART_BYTES = 16 * 2**20, 256 * 2**20
TOKENIZER_SAMPLE_BYTES = 256 * 2**20  # text read to sample the tokenizer's training lines from
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """What a prepare writes; a resumed prepare must be given the same."""

    corpus: CorpusConfig
    tokenizer: TokenizerConfig
    shards: ShardConfig
    part_bytes: int | None = None  # None: a 64th of the corpus within MIN/MAX_PART_BYTES
    tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES

    def record(self, tokenizer_source: str) -> dict:
        return {
            "version": STATE_VERSION,
            "corpus": strict.plain(self.corpus),
            "tokenizer": strict.plain(self.tokenizer),
            "tokenizer_source": tokenizer_source,
            "shards": self.shards.layout(),
            "part_bytes": self.part_bytes,
            "tokenizer_sample_bytes": self.tokenizer_sample_bytes,
        }


@dataclasses.dataclass(frozen=True)
class PartPlan:
    """Consecutive work units, and the fingerprint of their files (name, size, mtime)."""

    number: int
    units: tuple[WorkUnit, ...]
    bytes: int
    fingerprint: str


def prepare(
    settings: PrepareSettings, out: Path, *, workers: int = 0, tokenizer_dir: str | None = None, progress: bool = True
) -> dict[str, Manifest]:
    """Prepare (or finish preparing) `out`; returns the split manifests."""
    corpus = settings.corpus
    if corpus.heldout_fraction == 0:
        raise DataError(
            "--heldout-fraction 0 leaves the held-out split that prepare writes empty; give a "
            "fraction > 0 (or build the splits with `performer data shards --split`)"
        )
    skipped: list[Skipped] = []  # by the plan (unreadable Parquet footers), then by each part
    units = plan(corpus, skipped)
    sizes = unit_bytes(units)
    if settings.part_bytes is None:
        total = sum(sizes)
        settings = dataclasses.replace(settings, part_bytes=min(max(total // 64, MIN_PART_BYTES), MAX_PART_BYTES))
    parts = plan_parts(units, sizes, settings.part_bytes)
    state = out / STATE_DIR
    tokenizer = _tokenizer(settings, out, state, units, sizes, tokenizer_dir)
    records = _run_parts(settings, out, state, parts, tokenizer, workers, progress)
    skipped += [Skipped(**entry) for record in records for entry in record["skipped"]]
    source = {"corpus": strict.plain(corpus), **skip_record(corpus, skipped)}
    manifests = {}
    for split in SPLITS:
        split_parts = [_load_part(state, part.number, split) for part in parts]
        manifests[split] = finish_split(
            out / split,
            split_parts,
            split=split,
            special=tokenizer.special,
            config=settings.shards,
            tokenizer_fingerprint=tokenizer.fingerprint,
            source=source,
        )
    return manifests


# ------------------------------------------------------------------------------------- planning


def unit_bytes(units: list[WorkUnit]) -> list[int]:
    """Input bytes of each unit: its file's size, shared evenly by the row groups of one file."""
    shares: dict[str, int] = {}
    for unit in units:
        shares[unit.path] = shares.get(unit.path, 0) + 1
    return [max(os.path.getsize(unit.path) // shares[unit.path], 1) for unit in units]


def plan_parts(units: list[WorkUnit], sizes: list[int], part_bytes: int) -> list[PartPlan]:
    """Consecutive units in plan order, each part closed once it holds `part_bytes` of input."""
    parts, current, size = [], [], 0
    for unit, nbytes in zip(units, sizes):
        current.append(unit)
        size += nbytes
        if size >= part_bytes:
            parts.append(_part(len(parts), current, size))
            current, size = [], 0
    if current:
        parts.append(_part(len(parts), current, size))
    return parts


def _part(number: int, units: list[WorkUnit], size: int) -> PartPlan:
    digest = hashlib.sha256()
    for unit in units:
        stat = os.stat(unit.path)
        digest.update(json.dumps([unit.label, unit.format, stat.st_size, stat.st_mtime_ns]).encode())
    return PartPlan(number, tuple(units), size, digest.hexdigest())


# ------------------------------------------------------------------------------------ tokenizer


def train_and_report(texts: Iterable[str], config: TokenizerConfig, out: Path) -> Tokenizer:
    """`train_tokenizer`, then one line saying what was trained, in how long, where."""
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, config, out)
    print(
        f"tokenizer: {config.model_type}, vocab {config.vocab_size} ({config.num_sentinels} sentinels), "
        f"trained in {time.perf_counter() - started:.1f}s -> {out}"
    )
    return tokenizer


def _tokenizer(
    settings: PrepareSettings, out: Path, state: Path, units: list[WorkUnit], sizes: list[int], explicit: str | None
) -> Tokenizer:
    """The tokenizer of this prepare: resumed, copied from `explicit`, or trained on a sample; the
    state's plan.json is written (or checked against) once it is known."""
    target = out / TOKENIZER_DIR
    source = "given" if explicit is not None else "sampled"
    wanted = settings.record(source)
    plan_path = state / "plan.json"
    if plan_path.is_file():
        saved = json.loads(plan_path.read_text())
        if {k: v for k, v in saved.items() if k != "tokenizer_fingerprint"} != wanted:
            raise DataError(
                f"{out} holds a prepare of other settings or another corpus ({plan_path}); run the same "
                f"command to finish it, or pass another --out, or delete {state} to start over"
            )
        tokenizer = Tokenizer.load(target)
        if tokenizer.fingerprint != saved["tokenizer_fingerprint"]:
            raise DataError(f"{target} is not the tokenizer this prepare started with; delete {state} to start over")
        return tokenizer
    if explicit is not None:
        tokenizer = Tokenizer.load(explicit)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(explicit, target)
    else:
        tokenizer = train_and_report(sample_texts(settings, units, sizes), settings.tokenizer, target)
    state.mkdir(parents=True, exist_ok=True)
    write_json_atomically(plan_path, {**wanted, "tokenizer_fingerprint": tokenizer.fingerprint})
    return tokenizer


def sample_texts(settings: PrepareSettings, units: list[WorkUnit], sizes: list[int]) -> Iterator[str]:
    """Training documents of a seeded choice of units (read in plan order) holding about
    `tokenizer_sample_bytes`: all of a corpus smaller than that. Held-out text stays unseen. What
    it skips is skipped again, and counted, by the part that holds it."""
    corpus = settings.corpus
    order = np.random.default_rng(settings.tokenizer.seed).permutation(len(units))
    chosen, total = [], 0
    for position in order:
        if total >= settings.tokenizer_sample_bytes and corpus.max_documents is None:
            break
        chosen.append(int(position))
        total += sizes[position]
    sample = PartPlan(-1, tuple(units[position] for position in sorted(chosen)), total, "")
    for kept, document in enumerate(_part_documents(sample, corpus, skipped=[])):
        if corpus.max_documents is not None and kept >= corpus.max_documents:
            return  # --max-documents: the tokenizer sees the first N documents' training text
        if split_of(document.text, corpus.heldout_fraction, corpus.split_salt) == "train":
            yield document.text


# ------------------------------------------------------------------------------------ the parts


def _run_parts(
    settings: PrepareSettings,
    out: Path,
    state: Path,
    parts: list[PartPlan],
    tokenizer: Tokenizer,
    workers: int,
    progress: bool,
) -> list[dict]:
    """Every part's record, writing the parts not already done (by a pool of `workers`)."""
    records: dict[int, dict] = {}
    todo = []
    for part in parts:
        record = _finished(state, part)
        if record is not None:
            records[part.number] = record
        else:
            todo.append(part)
    total = sum(part.bytes for part in parts)
    done = total - sum(part.bytes for part in todo)
    bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="prepare", disable=not progress)
    totals = {"documents": 0, "tokens": 0}

    def finished(record: dict) -> None:
        records[record["part"]] = record
        bar.update(record["bytes"])
        for key in totals:
            totals[key] += sum(record[split][key] for split in SPLITS)
        bar.set_postfix(documents=f"{totals['documents']:,}", tokens=f"{totals['tokens']:,}")

    def task(part: PartPlan, limit: int | None = None) -> tuple:
        return settings, str(out), str(state), part, str(out / TOKENIZER_DIR), limit

    tasks = [task(part) for part in todo]
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    try:
        if settings.corpus.max_documents is not None:
            # The first N documents: each part's share depends on the parts before it, so in order.
            for part in parts:
                if part.number not in records:
                    kept = sum(records[number]["kept"] for number in range(part.number))
                    limit = max(settings.corpus.max_documents - kept, 0)
                    finished(_prepare_part(task(part, limit)))
        elif workers == 1:
            for record in map(_prepare_part, tasks):
                finished(record)
        else:
            # fork: the workers inherit the imported modules; each loads the tokenizer once.
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with context.Pool(workers) as pool:
                for record in pool.imap_unordered(_prepare_part, tasks):
                    finished(record)
    finally:
        bar.close()
    return [records[part.number] for part in parts]


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _prepare_part(task) -> dict:
    """Read one part's units once, write its train and held-out shards; returns its record."""
    settings, out, state, part, tokenizer_dir, limit = task
    out, state = Path(out), Path(state)
    if tokenizer_dir not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[tokenizer_dir] = Tokenizer.load(tokenizer_dir)
    tokenizer = _WORKER_TOKENIZERS[tokenizer_dir]
    corpus = settings.corpus
    _remove_part_files(out, state, part.number)
    writers = {
        split: PartWriter(
            out / split, prefix=f"{split}-p{part.number:05d}", special=tokenizer.special, config=settings.shards
        )
        for split in SPLITS
    }
    skipped: list[Skipped] = []
    kept = 0
    try:
        for document in _part_documents(part, corpus, skipped):
            if limit is not None and kept >= limit:
                break
            kept += 1
            split = split_of(document.text, corpus.heldout_fraction, corpus.split_salt)
            writers[split].add(np.asarray(tokenizer.encode(document.text), dtype=np.int64))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    record: dict = {"part": part.number, "fingerprint": part.fingerprint, "bytes": part.bytes, "kept": kept}
    for split, writer in writers.items():
        written = writer.close()
        for name, array in written.arrays.items():
            save_array_atomically(state / f"part-{part.number:05d}-{split}-{name}.npy", array)
        record[split] = {
            "shards": [dataclasses.asdict(shard) for shard in written.shards],
            "documents": int(len(written.arrays["documents"])),
            "tokens": int(written.arrays["documents"].sum(dtype=np.int64)),
        }
    record["skipped"] = [entry._asdict() for entry in skipped]
    write_json_atomically(_record_path(state, part.number), record)  # last: the part is done
    return record


def _part_documents(part: PartPlan, corpus: CorpusConfig, skipped: list[Skipped]) -> Iterator:
    """The part's documents long enough to keep (corpus.min_chars), in plan order."""
    for unit in part.units:
        for document in read_unit(unit, text_field=corpus.text_field, on_error=corpus.on_error, skipped=skipped):
            if len(document.text.strip()) >= corpus.min_chars:
                yield document


def _record_path(state: Path, number: int) -> Path:
    return state / f"part-{number:05d}.json"


def _finished(state: Path, part: PartPlan) -> dict | None:
    """The part's record when the part is done and its input files are unchanged, else None."""
    path = _record_path(state, part.number)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != part.fingerprint:
        return None
    out = state.parent
    for split in SPLITS:
        for shard in record[split]["shards"]:
            file = out / split / shard["path"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                return None
        for name in INDEX_FILES:
            if not (state / f"part-{part.number:05d}-{split}-{name}.npy").is_file():
                return None
    return record


def _remove_part_files(out: Path, state: Path, number: int) -> None:
    """What an interrupted attempt at this part left behind."""
    _record_path(state, number).unlink(missing_ok=True)
    for split in SPLITS:
        for leftover in (out / split).glob(f"{split}-p{number:05d}-*.tar"):
            leftover.unlink()


def _load_part(state: Path, number: int, split: str) -> Part:
    record = json.loads(_record_path(state, number).read_text())
    shards = tuple(ShardInfo(**shard) for shard in record[split]["shards"])
    arrays = {name: np.load(state / f"part-{number:05d}-{split}-{name}.npy") for name in INDEX_FILES}
    return Part(shards, arrays)


# ---------------------------------------------------------------------------------- what was skipped

MAX_SKIPS_RECORDED = 1000  # entries of the skip list kept in a manifest (the counts are complete)


def skip_record(corpus: CorpusConfig, skipped: list[Skipped]) -> dict:
    """The manifest's account of what `--on-error skip` left out (empty under stop)."""
    if corpus.on_error != "skip":
        return {}
    return {
        "skipped": {
            "files": sum(s.what == "file" for s in skipped),
            "records": sum(s.what == "record" for s in skipped),
            "list": [s._asdict() for s in skipped[:MAX_SKIPS_RECORDED]],
        }
    }
