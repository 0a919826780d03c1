"""Shard writing (webdataset-compatible, reproducible) and each kind of corrupt shard."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from synthetic import SYNTHETIC_SPECIAL, causal_config, synthetic_documents, write_synthetic

from data.shards import (
    Manifest,
    ShardConfig,
    ShardError,
    sha256_file,
    verify_manifest,
    verify_shard,
    write_shards,
    write_shards_v1,
)
from data.stream import DataError, TokenStream


def test_manifest_matches_the_tars_and_the_index(synthetic_shards):
    root, docs = synthetic_shards
    manifest = Manifest.load(root)
    assert manifest.version == 2 and len(manifest.shards) == 6 and manifest.documents == 60
    assert manifest.tokens == sum(len(d) for d in docs)
    assert manifest.dtype == "uint32" and manifest.special == SYNTHETIC_SPECIAL
    raw = json.loads((root / "manifest.json").read_text())
    assert raw["documents"] == 60 and [s["documents"] for s in raw["shards"]] == [10] * 6
    index = manifest.split_index
    np.testing.assert_array_equal(index.documents, [len(d) for d in docs])
    np.testing.assert_array_equal(index.shards[:, 0], np.arange(0, 61, 10))
    for name, entry in raw["index"].items():
        assert entry["sha256"] == sha256_file(root / entry["path"])
        assert isinstance(np.load(root / entry["path"], mmap_mode="r"), np.memmap)  # mapped, not read
    for position, shard in enumerate(manifest.shards):
        path = root / shard.path
        assert shard.bytes == path.stat().st_size and shard.sha256 == sha256_file(path)
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        # One pair per ~1 MiB: these 10 small documents are a single pair, keyed by the first one.
        key = f"{0:09d}"  # the index in its shard of the pair's first document
        assert [m.name for m in members] == [f"{key}.lengths.u32", f"{key}.tokens.u32"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        assert members[1].offset_data == index.members[position, 1]
        assert path.read_bytes()[257:263] == b"ustar\x00"  # POSIX ustar magic, not GNU or pax
        assert verify_shard(manifest, shard).lengths.tolist() == [len(d) for d in docs[10 * position :][:10]]


def test_webdataset_reads_our_shards(synthetic_shards):
    root, docs = synthetic_shards
    urls = [str(root / s.path) for s in Manifest.load(root).shards]
    read, shard, first_in_shard = [], None, 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        lengths = np.frombuffer(sample["lengths.u32"], dtype="<u4")
        tokens = np.frombuffer(sample["tokens.u32"], dtype="<u4")
        if sample["__url__"] != shard:
            shard, first_in_shard = sample["__url__"], len(read)
        # the key: the index in its shard of the pair's first document
        assert int(sample["__key__"]) == len(read) - first_in_shard and lengths.sum() == len(tokens)
        read += np.split(tokens, np.cumsum(lengths)[:-1])
    assert len(read) == len(docs)
    for got, want in zip(read, docs):
        np.testing.assert_array_equal(got, want)


def test_writing_is_reproducible_and_respects_limits(tmp_path):
    docs = synthetic_documents([100] * 25)
    for name in ("a", "b"):
        write_shards(
            docs,
            tmp_path / name,
            split="train",
            special=SYNTHETIC_SPECIAL,
            config=ShardConfig(max_samples_per_shard=10, max_bytes_per_shard=2000, max_bytes_per_member=1000),
        )
    a, b = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.index == b.index  # the index files are reproducible too (same sha256)
    # 400 payload bytes per document: a shard closes once it holds >= 2000 bytes (5 documents),
    # a pair before it would exceed 1000 bytes (2 documents).
    assert [s.documents for s in a.shards] == [5] * 5
    np.testing.assert_array_equal(a.split_index.members[:, 0], [0, 2, 4, 5, 7, 9, 10, 12, 14, 15, 17, 19, 20, 22, 24])
    # A document larger than the pair limit is a pair of its own; no pair spans two shards.
    big = write_shards(
        synthetic_documents([10, 600, 10, 10]),
        tmp_path / "e",
        split="train",
        special=SYNTHETIC_SPECIAL,
        config=ShardConfig(max_samples_per_shard=3, max_bytes_per_member=100),
    )
    np.testing.assert_array_equal(big.split_index.members[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(big.split_index.shards, [[0, 0], [3, 3], [4, 4]])
    small = write_shards(
        synthetic_documents([7]),
        tmp_path / "c",
        split="train",
        special=dataclasses.replace(SYNTHETIC_SPECIAL, vocab_size=1000),
    )
    assert small.dtype == "uint16" and small.field == "u16"
    with pytest.raises(ValueError, match="outside"):
        write_shards(
            synthetic_documents([7]),
            tmp_path / "d",
            split="train",
            special=dataclasses.replace(SYNTHETIC_SPECIAL, vocab_size=12),
        )
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())  # nothing half-written


def test_tar_bytes_per_token_on_web_like_documents(tmp_path):
    """~700-token documents, uint16 ids: the tar holds at most 1.1x the raw token bytes (it was
    ~1.45x with a member per document)."""
    lengths = np.random.default_rng(0).lognormal(np.log(550), 0.7, size=3000).astype(int) + 1
    special = dataclasses.replace(SYNTHETIC_SPECIAL, vocab_size=32000)
    rng = np.random.default_rng(1)
    docs = [rng.integers(10, 31000, size=n) for n in lengths]
    manifest = write_shards(docs, tmp_path, split="train", special=special)
    size = sum(s.bytes for s in manifest.shards)
    assert manifest.dtype == "uint16" and 650 < manifest.tokens / manifest.documents < 750
    assert size / (2 * manifest.tokens) < 1.02


def _rehash(root, manifest, shard_index, **changes):
    """Rewrite the manifest so that it agrees with the (damaged) file except for `changes`."""
    raw = json.loads((root / "manifest.json").read_text())
    entry = raw["shards"][shard_index]
    path = root / entry["path"]
    entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    entry.update(changes)
    (root / "manifest.json").write_text(json.dumps(raw))
    return Manifest.load(root)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _drop_last_member(path):
    """A tar cut exactly at a member boundary: parses cleanly, one sample short."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        cut = members[-1].offset
    data = path.read_bytes()
    path.write_bytes(data[:cut] + b"\0" * 1024)


CORRUPTIONS = {
    # kind: (damage, rehash manifest so only the deeper check can notice, expected reason)
    "size": (_truncate, False, "size"),
    "truncated": (_truncate, True, "past the end"),
    "garbage": (_garbage, True, "not a readable tar"),
    "sha256": (lambda path: None, "sha", "sha256"),
    "fewer_members": (_drop_last_member, True, "past the end of the 2048-byte file"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_corruption_is_reported_counted_and_skipped(synthetic_shards, kind):
    root, docs = synthetic_shards
    damage, rehash, reason = CORRUPTIONS[kind]
    manifest = Manifest.load(root)
    victim = manifest.shards[2]
    damage(root / victim.path)
    if rehash == "sha":
        manifest = _rehash(root, manifest, 2, sha256="0" * 64)
    elif rehash:
        manifest = _rehash(root, manifest, 2)
    for full in (True, False):  # `performer data verify`, and the stream's start-up
        with pytest.raises(ShardError, match=reason):
            verify_shard(manifest, manifest.shards[2], full=full)
        good, bad = verify_manifest(manifest, full=full)
        assert list(bad) == [victim.path] and len(good) == 5
    if kind == "sha256":
        # Right size, other bytes: training on would silently change the data; stop, name the shard.
        with pytest.raises(DataError, match=f"{victim.path}.*verify_sha256=false"):
            TokenStream(causal_config(root, batch_size=1), rank=0, world_size=2)
        return

    # Every rank sees the same bad shard and skips it: the epoch covers exactly the other 50 docs.
    tokens = []
    for rank in range(2):
        with pytest.warns(RuntimeWarning, match=victim.path):
            stream = TokenStream(causal_config(root, batch_size=1), rank=rank, world_size=2)
        assert list(stream.bad_shards) == [victim.path]
        for batch in stream.iter_epoch():
            tokens.append(batch["input_ids"].numpy().ravel())
    seen = set(np.concatenate(tokens).tolist())
    lost = set(np.concatenate(docs[20:30]).tolist())
    assert not seen & lost
    assert len(seen - {SYNTHETIC_SPECIAL.eos_id}) > 0.8 * sum(len(d) for d in docs[:20] + docs[30:])


def test_all_shards_bad_is_a_clear_error(tmp_path):
    write_synthetic(tmp_path, [50] * 4, samples_per_shard=2)
    for shard in Manifest.load(tmp_path).shards:
        _garbage(tmp_path / shard.path)
    with pytest.raises(DataError, match="sha256.*train-000000.tar"):  # same size, other bytes: stop
        TokenStream(causal_config(tmp_path))
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match="all 2 shards .* failed verification"):
        TokenStream(causal_config(tmp_path, verify_sha256=False))


INDEX_DAMAGE = {
    # kind: (damage to index-documents.npy, expected DataError)
    "missing": (lambda path: path.unlink(), "index file .*index-documents.npy .* is missing"),
    "flipped byte": (lambda path: path.write_bytes(path.read_bytes()[:-1] + b"\x7f"), "sha256 differs"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:100]), "size 100, manifest says"),
}


@pytest.mark.parametrize("kind", list(INDEX_DAMAGE))
def test_a_missing_stale_or_damaged_index_is_a_clear_error(synthetic_shards, kind):
    root, _ = synthetic_shards
    damage, message = INDEX_DAMAGE[kind]
    damage(root / "index-documents.npy")
    manifest = Manifest.load(root)
    for check in (lambda: verify_manifest(manifest), lambda: TokenStream(causal_config(root))):
        with pytest.raises(DataError, match=f"{message}.*performer data shards"):
            check()


def test_an_index_left_from_another_writing_of_the_split_is_stale(tmp_path):
    write_synthetic(tmp_path / "old", [50] * 20, samples_per_shard=10)
    write_synthetic(tmp_path / "new", [60] * 20, samples_per_shard=10)
    (tmp_path / "old" / "index-documents.npy").replace(tmp_path / "new" / "index-documents.npy")
    with pytest.raises(DataError, match="index-documents.npy does not match the manifest"):
        TokenStream(causal_config(tmp_path / "new"))
    # Hashes rewritten to the stale file's: the per-shard counts still tell.
    raw = json.loads((tmp_path / "new" / "manifest.json").read_text())
    path = tmp_path / "new" / "index-documents.npy"
    raw["index"]["documents"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (tmp_path / "new" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="disagrees with its manifest .*500 tokens, the manifest says 600"):
        TokenStream(causal_config(tmp_path / "new"))


def test_full_verification_checks_every_member_the_stream_start_up_only_the_index(synthetic_shards):
    """A byte changed inside a member's token data, sha256 not checked: `performer data verify`
    (full) names the member; the stream's start-up (no tar parsing) accepts the shard, and reading
    loses that member's documents, reported by (shard, document), never its neighbours'."""
    root, docs = synthetic_shards
    manifest = Manifest.load(root)
    victim = manifest.shards[2]
    index = verify_shard(manifest, victim)
    data = bytearray((root / victim.path).read_bytes())
    data[int(index.offsets[3]) + 4] ^= 0x01  # document 3's second token
    (root / victim.path).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="member '000000000.tokens.u32': crc32"):
        verify_shard(manifest, victim, check_sha256=False)
    assert verify_shard(manifest, victim, check_sha256=False, full=False).members == 1

    stream = TokenStream(causal_config(root, batch_size=1, verify_sha256=False))
    assert stream.bad_shards == {}
    with pytest.warns(RuntimeWarning, match=f"{victim.path}: documents 0-9 lost \\(crc32"):
        tokens = np.concatenate([batch["input_ids"].numpy().ravel() for batch in stream.iter_epoch()])
    assert set(stream.lost_documents) == {(victim.path, d) for d in range(10)}
    assert not set(tokens.tolist()) & set(np.concatenate(docs[20:30]).tolist())


def test_version_1_splits_still_verify_and_stream(tmp_path):
    docs = synthetic_documents(np.random.default_rng(7).integers(5, 300, size=60))
    manifest = write_shards_v1(
        docs, tmp_path, split="train", special=SYNTHETIC_SPECIAL, config=ShardConfig(max_samples_per_shard=10)
    )
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["version"] == 1 and "index" not in raw and raw["shards"][0]["samples"] == 10
    with tarfile.open(tmp_path / manifest.shards[0].path) as tar:
        assert [m.name for m in tar.getmembers()][:2] == ["000000000.u32", "000000001.u32"]
    loaded = Manifest.load(tmp_path)
    assert loaded.version == 1 and loaded.documents == 60 and loaded.to_json() == raw
    good, bad = verify_manifest(loaded)
    assert len(good) == 6 and not bad and good[0].members == 10
    _drop_last_member(tmp_path / manifest.shards[2].path)
    loaded = _rehash(tmp_path, loaded, 2)
    with pytest.raises(ShardError, match="9 samples, manifest says 10"):
        verify_shard(loaded, loaded.shards[2])


def test_shard_token_sums_in_slices_equal_one_sum():
    """SplitIndex.shard_tokens sums a slice of shards at a time (no int64 copy of the whole column)."""
    from data.shards import SplitIndex

    rng = np.random.default_rng(0)
    documents = rng.integers(1, 1000, size=5000).astype(np.uint32)
    shards = np.zeros((302, 2), dtype=np.int64)
    shards[1:-1, 0] = np.sort(rng.choice(np.arange(1, 5000), size=300, replace=False))
    shards[-1, 0] = len(documents)
    index = SplitIndex(documents=documents, members=np.zeros((0, 3), dtype=np.int64), shards=shards)
    want = np.add.reduceat(documents, shards[:-1, 0], dtype=np.int64)
    for at_a_time in (1, 7, 300, 1024):
        np.testing.assert_array_equal(index.shard_tokens(at_a_time), want)
