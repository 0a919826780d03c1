"""Data faults on real WebDataset shards (real SentencePiece ids): each is detected, reported with the
shard's name, counted, and training goes on with every rank taking the same steps; only the
unreadable samples are lost. A shard whose sha256 differs stops the run before step 1 (exit 2).

Faults are injected by damaging the shard files on disk, before start-up (skipped at verification)
or after it (found while reading, mid-epoch).
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from jobs import REPO, TEST_SETTINGS, run_pretrain

from data.shards import Manifest, sha256_file, verify_shard
from data.stream import StreamConfig, TokenStream
from launcher.config import load_config
from launcher.dist import Topology
from launcher.streams import make_stream

SHARD_SAMPLES = 8  # sharded_data: 9 shards of 8 documents


# ------------------------------------------------------------------------------ damage on disk


def truncate(path: Path) -> None:
    """An interrupted copy: the first half of the file."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def cut_at_member_boundary(path: Path, manifest_root: Path) -> None:
    """A tar that ends cleanly one member early, and a manifest entry rewritten to its size and hash,
    so that only the index can tell (a tar cut at a boundary raises nothing)."""
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[-1].offset
    path.write_bytes(path.read_bytes()[:cut] + b"\0" * 1024)
    raw = json.loads((manifest_root / "manifest.json").read_text())
    for entry in raw["shards"]:
        if entry["path"] == path.name:
            entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (manifest_root / "manifest.json").write_text(json.dumps(raw))


def garbage(path: Path) -> None:
    """Random bytes of the same size (a bad disk, a bad transfer)."""
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def out_of_vocabulary(manifest: Manifest, position: int, member: int) -> None:
    """Token id 65535 (>= the vocabulary of 1000) inside one document; size and tar stay valid."""
    index = verify_shard(manifest, manifest.shards[position], check_sha256=False)
    path = manifest.root / manifest.shards[position].path
    data = bytearray(path.read_bytes())
    offset = int(index.offsets[member]) + 2 * 5  # the document's 6th token
    data[offset : offset + 2] = b"\xff\xff"
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda path, root: truncate(path),
    "cut_at_member_boundary": cut_at_member_boundary,
    "garbage": lambda path, root: garbage(path),
    "empty": lambda path, root: empty(path),
}
REASONS = {
    "truncated": "size .* manifest says",
    "cut_at_member_boundary": r"past the end of the \d+-byte file",
    "garbage": "not a readable tar",
    "empty": "size 0 bytes",
}


def causal_stream(root: Path, rank: int, **overrides) -> TokenStream:
    """Rank `rank` of 2; causal LM rows of 513 tokens so that a whole epoch is ~70 batches."""
    values = dict(
        manifest=str(root / "train"),
        objective="causal_lm",
        input_length=512,
        batch_size=8,
        seed=3,
        verify_sha256=False,
    )
    return TokenStream(StreamConfig(**{**values, **overrides}), rank=rank, world_size=2)


# ------------------------------------------------------------------ unit level: the stream, 2 ranks


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_shard_is_skipped_alike_by_every_rank(data_copy, kind):
    manifest = Manifest.load(data_copy / "train")
    victim = manifest.shards[3].path
    DAMAGE[kind](data_copy / "train" / victim, data_copy / "train")
    streams = []
    for rank in range(2):
        with pytest.warns(RuntimeWarning, match=f"skipping corrupt shard {victim}"):
            streams.append(causal_stream(data_copy, rank))
    for stream in streams:
        assert list(stream.bad_shards) == [victim]
        assert __import__("re").search(REASONS[kind], stream.bad_shards[victim])
        assert stream.lost_samples == SHARD_SAMPLES  # that shard's documents, nothing else
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch > 0


def test_sha256_mismatch_is_an_error_naming_the_shard_and_the_fix(data_copy):
    raw = json.loads((data_copy / "train" / "manifest.json").read_text())
    raw["shards"][5]["sha256"] = "0" * 64
    (data_copy / "train" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="train-000005.tar.*performer data verify.*verify_sha256=false"):
        causal_stream(data_copy, 0, verify_sha256=True)
    assert causal_stream(data_copy, 0).bad_shards == {}  # hashing off: the bytes are intact


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_going_bad_mid_epoch_cost_only_their_documents(data_copy, workers):
    """After verification one shard is truncated, one deleted, one document gets an id >= vocab:
    both ranks still yield exactly steps_per_epoch batches, never an id outside the vocabulary,
    and the documents reported lost are exactly those of the unreadable members (also through
    DataLoader worker processes, where the report travels with its batch)."""
    streams = [causal_stream(data_copy, rank, num_workers=workers) for rank in range(2)]
    manifest = streams[0].manifest
    root = data_copy / "train"
    truncated, deleted = manifest.shards[1], manifest.shards[6]
    index = verify_shard(manifest, truncated, check_sha256=False)
    cut = int(index.offsets[5])  # the member pair holding document 5 (and any later one) now ends past the end
    (root / truncated.path).write_bytes((root / truncated.path).read_bytes()[:cut])
    (root / deleted.path).unlink()
    out_of_vocabulary(manifest, 4, 2)  # its pair's crc32 no longer matches the index
    damaged = verify_shard(manifest, manifest.shards[4], check_sha256=False, full=False)
    expected = (
        {(truncated.path, m) for m in range(index.member_documents(index.member_of(5)).start, SHARD_SAMPLES)}
        | {(deleted.path, m) for m in range(SHARD_SAMPLES)}
        | {(manifest.shards[4].path, m) for m in damaged.member_documents(damaged.member_of(2))}
    )
    assert {(truncated.path, 5), (manifest.shards[4].path, 2)} <= expected

    counts = []
    for stream in streams:
        steps = stream.steps_per_epoch
        batches = 0
        with pytest.warns(RuntimeWarning, match="lost"):
            for batch in stream.iter_epoch():
                assert int(batch["input_ids"].max()) < manifest.special.vocab_size
                assert set(batch) == {"input_ids", "attention_mask", "labels"}
                batches += 1
        counts.append((batches, steps))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] > 60
    lost = set(streams[0].lost_documents) | set(streams[1].lost_documents)
    assert lost == expected, lost ^ expected
    reasons = {**streams[0].lost_documents, **streams[1].lost_documents}
    assert "crc32" in reasons[(manifest.shards[4].path, 2)]
    assert "token id 65535 >= vocabulary size 1000" in reasons[(manifest.shards[4].path, 2)]
    assert "short read" in reasons[(truncated.path, 5)]
    assert "unreadable" in reasons[(deleted.path, 0)]
    # The next epoch is planned the same on both ranks (the damage is a property of the files).
    layouts = [stream.sources[0].order.layout(1) for stream in streams]
    np.testing.assert_array_equal(layouts[0].shards, layouts[1].shards)
    assert streams[0].rows_per_epoch == streams[1].rows_per_epoch


def test_shell_metacharacters_in_shard_paths_are_refused_unless_allowed(data_copy):
    raw = json.loads((data_copy / "train" / "manifest.json").read_text())
    original = raw["shards"][0]["path"]
    for bad in ("train-000000.tar;touch pwned", "$(touch pwned).tar", "x`id`.tar", "a|b.tar", "a&b.tar"):
        raw["shards"][0]["path"] = bad
        (data_copy / "train" / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(ValueError, match="shell metacharacter.*allow_shell_characters"):
            causal_stream(data_copy, 0)
    # The opt-in: the name is then only a (missing) file name, never a command.
    (data_copy / "train" / "train-000000.tar").rename(data_copy / "train" / "a&b.tar")
    stream = causal_stream(data_copy, 0, allow_shell_characters=True)
    assert stream.bad_shards == {} and not (REPO / "pwned").exists() and not Path("pwned").exists()
    raw["shards"][0]["path"] = "pipe:cat " + original
    (data_copy / "train" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="pipe: command; set data.allow_pipe=true"):
        causal_stream(data_copy, 0, allow_shell_characters=True)


# ----------------------------------------------------------------- end to end: the trainer, 2 ranks


def _trainer_stream(data: Path, rank: int):
    """The stream the trainer's rank builds with TEST_SETTINGS (same plan, same batches)."""
    config = load_config([REPO / "configs" / "tiny.yaml"], [*TEST_SETTINGS, f"data.manifest={data / 'train'}"])
    return make_stream(config, data / "train", Topology(rank=rank, world_size=2, local_rank=rank))


@pytest.mark.slow
def test_trainer_skips_damaged_shards_and_lost_documents_on_two_ranks(data_copy, tmp_path):
    root = data_copy / "train"
    manifest = Manifest.load(root)
    victims = {}
    for position, kind in zip((0, 2, 5, 7), DAMAGE):
        victims[manifest.shards[position].path] = kind
        DAMAGE[kind](root / manifest.shards[position].path, root)
    # A document rank 1 reads in its first batch gets an id >= vocab (verification cannot see it).
    with pytest.warns(RuntimeWarning):
        stream = _trainer_stream(data_copy, rank=1)
    shard, document = stream.document_at(1 * stream.config.batch_size)  # rank 1's batch 0 starts at row B
    bad_doc = (manifest.shards[shard].path, document)
    out_of_vocabulary(manifest, shard, document)
    index = stream.indices[shard]  # the whole member pair holding it is lost
    bad_docs = [(bad_doc[0], m) for m in index.member_documents(index.member_of(bad_doc[1]))]

    run = run_pretrain(data_copy, tmp_path / "run")
    assert run.returncode == 0, run.output[-4000:]
    # Every rank took all 8 steps (a rank short of batches would hang the next all-reduce).
    assert sorted(run.losses()) == list(range(1, 9)) and all(map(math.isfinite, run.losses().values()))
    assert (run.directory / "checkpoints" / "latest").read_text().strip() == "step00000008"
    events = run.records("event")
    skipped = {e["data_bad_shard"]: e for e in events if "data_bad_shard" in e and e["split"] == "train"}
    assert set(skipped) == set(victims)
    for path, kind in victims.items():
        assert __import__("re").search(REASONS[kind], skipped[path]["reason"]), (kind, skipped[path])
        assert skipped[path]["samples_lost"] == SHARD_SAMPLES and path in run.output
    lost = [(e["data_lost_document"], e["member"]) for e in events if "data_lost_document" in e]
    assert sorted(lost) == bad_docs and len(set(lost)) == len(lost), lost  # once, though both ranks may have read it
    final = run.records("train")[-1]
    assert final["data_skipped_shards"] == 4
    assert final["data_lost_samples"] == 4 * SHARD_SAMPLES + len(bad_docs)
    assert "token id 65535 >= vocabulary size 1000" in run.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run.directory / "tensorboard"))
    board.Reload()
    assert [e.value for e in board.Scalars("train/data_lost_samples")] == [4.0 * SHARD_SAMPLES + len(bad_docs)] * 8
    assert sorted(e.value for e in board.Scalars("events/samples_lost")) == [8.0] * 4


@pytest.mark.slow
def test_trainer_stops_before_step_one_on_a_sha256_mismatch(data_copy, tmp_path):
    raw = json.loads((data_copy / "train" / "manifest.json").read_text())
    raw["shards"][4]["sha256"] = "f" * 64
    (data_copy / "train" / "manifest.json").write_text(json.dumps(raw))
    run = run_pretrain(data_copy, tmp_path / "run", "data.verify_sha256=true")
    assert run.returncode == 2, run.output[-4000:]
    for rank in (0, 1):
        assert f"[rank {rank}] error: data: 1 shard(s)" in run.output
    assert "train-000004.tar" in run.output and "data.verify_sha256=false" in run.output
    assert run.records("train") == [] and not (tmp_path / "run" / "checkpoints").exists()
