"""`performer data prepare` in parallel and resumable (data/prepare.py): the bytes it writes do not
depend on --workers or on an interruption; a resumed prepare must be given the same settings."""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data.prepare
from data.shards import Manifest
from data.stream import StreamConfig, TokenStream
from launcher.__main__ import main
from tests.launcher.jobs import run_pretrain

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éß"))
WORDS = ["".join(np.random.default_rng(i).choice(_LETTERS, size=3 + i % 6)) for i in range(600)]


def corpus_rows(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        words = rng.choice(WORDS, size=int(rng.integers(20, 120)))
        rows.append({"text": " ".join(words) + f"\nline two of {seed}-{i}", "url": f"u{seed}-{i}"})
    return rows


def c4_like(root: Path, files: int = 6, rows: int = 40) -> Path:
    """A C4-shaped directory: gzipped JSON lines of (text, url), several files (several parts)."""
    directory = root / "c4"
    directory.mkdir(parents=True)
    for number in range(files):
        lines = "".join(json.dumps(row) + "\n" for row in corpus_rows(rows, number))
        (directory / f"c4-train.{number:05d}-of-01024.json.gz").write_bytes(gzip.compress(lines.encode(), mtime=0))
    return directory


SETTINGS = [
    "--vocab-size",
    "400",
    "--num-sentinels",
    "10",
    "--heldout-fraction",
    "0.1",
    "--max-samples-per-shard",
    "32",
]


def prepare(paths: str, out: Path, *extra: str) -> int:
    return main(["data", "prepare", "--paths", paths, "--out", str(out), *SETTINGS, "--part-bytes", "4000", *extra])


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file a prepare leaves for its users (its state directory aside)."""
    return {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.rglob("*"))
        if path.is_file() and data.prepare.STATE_DIR not in path.parts
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """The corpus, and one uninterrupted prepare of it with one worker."""
    root = tmp_path_factory.mktemp("prepare")
    corpus = c4_like(root)
    assert prepare(str(corpus), root / "one", "--workers", "1") == 0
    return corpus, root / "one", digests(root / "one")


def test_several_parts_make_one_split_the_stream_reads(reference):
    corpus, out, _ = reference
    records = sorted((out / data.prepare.STATE_DIR).glob("part-*.json"))
    assert len(records) == 6  # one gzip file of ~2.9 kB per part at --part-bytes 4000
    train, heldout = Manifest.load(out / "train"), Manifest.load(out / "heldout")
    assert train.documents + heldout.documents == 240 and heldout.documents >= 10
    assert [shard.path for shard in train.shards][:2] == ["train-p00000-000000.tar", "train-p00000-000001.tar"]
    assert {shard.path.split("-")[1] for shard in train.shards} == {f"p{n:05d}" for n in range(6)}
    stream = TokenStream(
        StreamConfig(manifest=str(out / "train"), objective="causal_lm", input_length=32, batch_size=4),
        rank=0,
        world_size=1,
    )
    assert next(iter(stream))["input_ids"].shape == (4, 32)


def test_two_workers_write_the_same_bytes_as_one(reference, tmp_path):
    corpus, _, expected = reference
    assert prepare(str(corpus), tmp_path / "two", "--workers", "2") == 0
    assert digests(tmp_path / "two") == expected


def test_an_interrupted_prepare_finishes_identically(reference, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the third part: its shards are half written, no record; the same
    command again reuses parts 0-1, redoes the rest, and writes the uninterrupted run's bytes."""
    corpus, _, expected = reference
    real_read_unit = data.prepare.read_unit
    reads = []

    def interrupted(unit, **kwargs):
        reads.append(unit.name)
        for count, document in enumerate(real_read_unit(unit, **kwargs)):
            # the second reading of file 2: the first was the tokenizer's sample
            if "00002-of" in unit.name and reads.count(unit.name) == 2 and count == 20:
                raise KeyboardInterrupt
            yield document

    monkeypatch.setattr(data.prepare, "read_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus), tmp_path / "out", "--workers", "1")
    state = tmp_path / "out" / data.prepare.STATE_DIR
    assert sorted(p.name for p in state.glob("part-*.json")) == ["part-00000.json", "part-00001.json"]
    assert list((tmp_path / "out" / "train").glob("train-p00002-*.tar"))  # debris of the interrupted part
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "train").glob("train-p0000[01]-*.tar")}

    monkeypatch.setattr(data.prepare, "read_unit", real_read_unit)
    assert prepare(str(corpus), tmp_path / "out", "--workers", "2") == 0
    assert digests(tmp_path / "out") == expected
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished parts were not rewritten


def test_a_changed_file_redoes_its_part_only(reference, tmp_path):
    corpus, out, _ = reference
    copy = tmp_path / "corpus"
    copy.mkdir()
    for path in sorted(corpus.iterdir()):
        (copy / path.name).write_bytes(path.read_bytes())
    assert prepare(str(copy), tmp_path / "out", "--workers", "1") == 0
    before = digests(tmp_path / "out")
    changed = copy / "c4-train.00004-of-01024.json.gz"
    changed.write_bytes(gzip.compress(b'{"text": "a different document altogether"}\n', mtime=0))
    assert prepare(str(copy), tmp_path / "out", "--workers", "1") == 0
    after = digests(tmp_path / "out")
    redone = {name for name in after if after[name] != before.get(name)}
    assert redone and all("p00004" in name or "manifest" in name or "index" in name for name in redone)


def test_resuming_with_other_settings_is_refused(reference, tmp_path, capsys):
    corpus, _, _ = reference
    assert prepare(str(corpus), tmp_path / "out", "--workers", "1") == 0
    capsys.readouterr()
    assert prepare(str(corpus), tmp_path / "out", "--workers", "1", "--seed", "3") == 2
    error = capsys.readouterr().err
    assert "holds a prepare of other settings or another corpus" in error and "delete" in error


def test_a_given_tokenizer_is_used_not_trained(reference, tmp_path, capsys):
    corpus, out, _ = reference
    capsys.readouterr()
    assert prepare(str(corpus), tmp_path / "out", "--workers", "1", "--tokenizer", str(out / "tokenizer")) == 0
    assert "trained in" not in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.model").read_bytes() == (
        out / "tokenizer" / "tokenizer.model"
    ).read_bytes()
    assert Manifest.load(tmp_path / "out" / "train").tokens == Manifest.load(out / "train").tokens


@pytest.mark.slow
def test_the_trainer_runs_on_a_prepared_parquet_corpus(tmp_path):
    """A FineWeb-shaped corpus (Parquet, several row groups), prepared, then 4 steps on 2 ranks."""
    rows = corpus_rows(400, seed=11)
    table = pa.table({"text": [row["text"] for row in rows], "id": [row["url"] for row in rows]})
    (tmp_path / "fineweb").mkdir()
    pq.write_table(table, tmp_path / "fineweb" / "000_00000.parquet", row_group_size=100)
    command = ["data", "prepare", "--paths", str(tmp_path / "fineweb"), "--out", str(tmp_path / "data")]
    assert main([*command, "--vocab-size", "600", "--num-sentinels", "100", "--part-bytes", "10000"]) == 0
    assert len(list((tmp_path / "data" / data.prepare.STATE_DIR).glob("part-*.json"))) == 4  # a row group each
    run = run_pretrain(tmp_path / "data", tmp_path / "run", "train.max_steps=4", "eval.interval=4")
    assert run.returncode == 0, run.output[-3000:]
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert run.records("eval")


def test_a_prepare_killed_with_sigkill_finishes_identically(tmp_path):
    """kill -9 while the parts are being written (many small parts), then the same command."""
    corpus = c4_like(tmp_path, files=100, rows=6)
    command = [str(Path(sys.executable).parent / "performer"), "data", "prepare", "--paths", str(corpus)]
    settings = [*SETTINGS, "--part-bytes", "1", "--workers", "1"]
    assert prepare(str(corpus), tmp_path / "reference", "--part-bytes", "1", "--workers", "1") == 0
    state = tmp_path / "out" / data.prepare.STATE_DIR
    process = subprocess.Popen(
        [*command, "--out", str(tmp_path / "out"), *settings], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (state / "part-00010.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert process.poll() is None, "the prepare ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 10 < len(list(state.glob("part-*.json"))) < 100
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()
    rerun = subprocess.run([*command, "--out", str(tmp_path / "out"), *settings], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert digests(tmp_path / "out") == digests(tmp_path / "reference")
