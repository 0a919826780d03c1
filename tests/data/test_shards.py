"""Shard writing (webdataset-compatible, reproducible) and each kind of corrupt shard."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from synthetic import SYNTHETIC_SPECIAL, causal_config, synthetic_documents, write_synthetic

from data.shards import Manifest, ShardConfig, ShardError, sha256_file, verify_manifest, verify_shard, write_shards
from data.stream import DataError, TokenStream


def test_manifest_matches_the_tars(synthetic_shards):
    root, docs = synthetic_shards
    manifest = Manifest.load(root)
    assert len(manifest.shards) == 6 and manifest.samples == 60
    assert manifest.tokens == sum(len(d) for d in docs)
    assert manifest.dtype == "uint32" and manifest.special == SYNTHETIC_SPECIAL
    for shard in manifest.shards:
        path = root / shard.path
        assert shard.bytes == path.stat().st_size and shard.sha256 == sha256_file(path)
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert len(members) == shard.samples
        assert all(m.mtime == 0 for m in members)
        assert path.read_bytes()[257:263] == b"ustar\x00"  # POSIX ustar magic, not GNU or pax


def test_webdataset_reads_our_shards(synthetic_shards):
    root, docs = synthetic_shards
    urls = [str(root / s.path) for s in Manifest.load(root).shards]
    read = [np.frombuffer(s["u32"], dtype="<u4") for s in wds.WebDataset(urls, shardshuffle=False)]
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
            config=ShardConfig(max_samples_per_shard=10, max_bytes_per_shard=2000),
        )
    a, b = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    # 400 payload bytes per document: a shard closes once it holds >= 2000 bytes (5 documents).
    assert [s.samples for s in a.shards] == [5] * 5
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
    "truncated": (_truncate, True, "tar|runs past|samples"),
    "garbage": (_garbage, True, "not a readable tar|samples"),
    "sha256": (lambda path: None, "sha", "sha256"),
    "fewer_samples": (_drop_last_member, True, "9 samples, manifest says 10"),
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
    with pytest.raises(ShardError, match=reason):
        verify_shard(manifest, manifest.shards[2])
    good, bad = verify_manifest(manifest)
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
