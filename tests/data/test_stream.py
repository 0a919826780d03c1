"""The stream's guarantees: exactly once per epoch, equal batch counts, exact resume, seeded order."""

from __future__ import annotations

import json
import tarfile
import warnings

import numpy as np
import pytest
import torch
from synthetic import SYNTHETIC_SPECIAL, batch_rows, causal_config, rank_batches, synthetic_documents, write_synthetic

from data.shards import ShardConfig, write_shards, write_shards_v1
from data.stream import StreamConfig, TokenStream

EOS = SYNTHETIC_SPECIAL.eos_id


def reference_rows(config) -> list[tuple]:
    """The epoch's rows in global order: one rank, batches of one row."""
    single = StreamConfig(**{**config.__dict__, "batch_size": 1, "num_workers": 0})
    return [tuple(r[0]) for r in rank_batches(single, 1)[0][0]]


@pytest.mark.parametrize("workers", [0, 1, 2], ids=lambda w: f"workers{w}")
def test_exactly_once_per_epoch_across_two_ranks(synthetic_shards, workers):
    root, docs = synthetic_shards
    config = causal_config(root, num_workers=workers)
    per_rank, _ = rank_batches(config, world=2)
    assert len(per_rank[0]) == len(per_rank[1]) == TokenStream(config, world_size=2).steps_per_epoch > 0
    rows = [tuple(r) for rank in per_rank for batch in rank for r in batch]
    assert len(set(rows)) == len(rows)  # no row twice
    tokens = np.concatenate([np.array(r) for r in rows])
    tokens = tokens[tokens != EOS]
    assert len(np.unique(tokens)) == len(tokens)  # no document token twice
    # Together the ranks cover the epoch's first steps*W*B rows: only the defined remainder
    # (< W*B rows + one partial row) is left out.
    reference = reference_rows(config)
    assert set(rows) == set(reference[: len(rows)])
    total = sum(len(d) + 1 for d in docs)
    assert total - len(rows) * 17 < (2 * 4 + 1) * 17
    # Batches do not depend on the number of workers.
    baseline, _ = rank_batches(causal_config(root, num_workers=0), world=2)
    for got, want in zip(per_rank, baseline):
        np.testing.assert_array_equal(np.stack(got), np.stack(want))


@pytest.mark.parametrize("world,workers", [(3, 2), (4, 1), (2, 2)])
def test_equal_batch_counts_with_skewed_shards_fewer_than_readers(tmp_path, world, workers):
    # One huge document, then many tiny ones: 2 shards of very different sizes, fewer shards
    # than ranks x workers.
    write_synthetic(tmp_path, [3000] + [3] * 40, samples_per_shard=40)
    config = causal_config(tmp_path, num_workers=workers, batch_size=2)
    per_rank, _ = rank_batches(config, world=world)
    counts = {len(rows) for rows in per_rank}
    expected = TokenStream(config, world_size=world).steps_per_epoch
    assert counts == {expected} and expected == TokenStream(config).rows_per_epoch // (world * 2)


def test_resume_same_world_size_gives_identical_batches(synthetic_shards):
    root, _ = synthetic_shards
    config = causal_config(root, num_workers=1)
    full, _ = rank_batches(config, world=2)
    head, states = rank_batches(config, world=2, steps=5)
    assert states[0] == states[1]  # the state is global: any rank can save it
    state = json.loads(json.dumps(states[0]))  # and it survives JSON (checkpoint client state)
    tail, _ = rank_batches(config, world=2, state=state)
    for rank in range(2):
        np.testing.assert_array_equal(np.stack(head[rank] + tail[rank]), np.stack(full[rank]))


def test_resume_two_to_three_ranks_has_no_repeats_and_no_gaps(synthetic_shards):
    root, _ = synthetic_shards
    config = causal_config(root, num_workers=2)
    head, states = rank_batches(config, world=2, steps=7)
    tail, end_states = rank_batches(config, world=3, state=states[0])
    rows = [tuple(r) for part in (head, tail) for rank in part for batch in rank for r in batch]
    assert len(set(rows)) == len(rows)
    reference = reference_rows(config)
    assert set(rows) == set(reference[: len(rows)])  # a contiguous prefix of the epoch: no gap
    assert len(reference) - len(rows) < 3 * 4  # the remainder at 3 ranks
    assert end_states[0]["epoch"] == 1 and end_states[0]["cursor"] == 0


def test_epochs_and_seeds_change_the_order(synthetic_shards):
    root, _ = synthetic_shards
    config = causal_config(root)
    stream = TokenStream(config)
    epoch0 = np.concatenate([b["input_ids"].numpy() for b in stream.iter_epoch()])
    assert stream.epoch == 1
    epoch1 = np.concatenate([b["input_ids"].numpy() for b in stream.iter_epoch()])
    again = np.concatenate([b["input_ids"].numpy() for b in TokenStream(config).iter_epoch()])
    other_seed = np.concatenate([b["input_ids"].numpy() for b in TokenStream(causal_config(root, seed=4)).iter_epoch()])
    np.testing.assert_array_equal(epoch0, again)
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, other_seed)
    # Same tokens, different order: an epoch is a permutation, not a resample.
    assert len(epoch0) == len(epoch1)


def test_iterating_runs_over_epochs_until_max_epochs(synthetic_shards):
    root, _ = synthetic_shards
    stream = TokenStream(causal_config(root, max_epochs=2))
    assert sum(1 for _ in stream) == 2 * stream.steps_per_epoch and stream.epoch == 2


def test_span_corruption_and_masked_lm_batches(synthetic_shards):
    root, _ = synthetic_shards
    special = SYNTHETIC_SPECIAL
    stream = TokenStream(StreamConfig(manifest=str(root), input_length=64, batch_size=3), world_size=1)
    batch = next(iter(stream))
    targets = StreamConfig(manifest=str(root), input_length=64).target_length
    assert batch["input_ids"].shape == (3, 64) and batch["attention_mask"].dtype == torch.bool
    assert bool(batch["attention_mask"].all())
    assert batch["decoder_input_ids"].shape == batch["labels"].shape == (3, targets)
    assert (batch["decoder_input_ids"][:, 0] == special.bos_id).all()
    assert (batch["decoder_input_ids"][:, 1:] == batch["labels"][:, :-1]).all()
    assert (batch["labels"][:, 0] == special.sentinel_id(0)).all() and (batch["labels"][:, -1] == special.eos_id).all()
    mlm = next(
        iter(TokenStream(StreamConfig(manifest=str(root), objective="masked_lm", input_length=32, batch_size=2)))
    )
    assert mlm["input_ids"].shape == mlm["labels"].shape == (2, 32)
    assert ((mlm["labels"] == -100) | (mlm["labels"] >= 10)).all()


def test_rank_from_environment_and_state_checks(synthetic_shards, monkeypatch):
    root, _ = synthetic_shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    stream = TokenStream(causal_config(root))
    assert (stream.rank, stream.world_size) == (1, 3)
    assert TokenStream(causal_config(root), rank=0, world_size=1).world_size == 1  # explicit wins
    state = stream.state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenStream(causal_config(root, seed=99)).load_state_dict(state)
    with pytest.raises(ValueError, match="cursor"):
        stream.load_state_dict({**state, "cursor": 10**9})
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="rank 3 is not in a world of size 3"):
        TokenStream(causal_config(root))


def test_stream_config_from_mapping_and_url_policy(synthetic_shards):
    root, _ = synthetic_shards
    config = StreamConfig.from_dict({"manifest": str(root), "batch_size": 8})
    assert config.batch_size == 8 and config.raw_length == 568
    with pytest.raises(ValueError, match="unknown config key .stream.batchsize."):
        StreamConfig.from_dict({"manifest": str(root), "batchsize": 8})
    manifest = json.loads((root / "manifest.json").read_text())
    for path, flag in (("pipe:cat x.tar", "allow_pipe"), ("https://example.com/x.tar", "allow_remote")):
        manifest["shards"][0]["path"] = path
        (root / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=flag):
            TokenStream(causal_config(root))


def test_too_little_data_for_one_step_is_an_error_not_an_endless_loop(tmp_path):
    write_synthetic(tmp_path, [20, 20], samples_per_shard=2)
    stream = TokenStream(causal_config(tmp_path, batch_size=4))
    assert stream.steps_per_epoch == 0 and list(stream.iter_epoch()) == []
    with pytest.raises(ValueError, match="fewer than one step"):
        next(iter(stream))


def test_allowed_pipe_shards_stream_the_same_batches(synthetic_shards):
    root, _ = synthetic_shards
    local = [b["input_ids"].numpy() for b in TokenStream(causal_config(root)).iter_epoch()]
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["path"] = f"pipe:cat {root / shard['path']}"
    (root / "manifest.json").write_text(json.dumps(manifest))
    piped = [b["input_ids"].numpy() for b in TokenStream(causal_config(root, allow_pipe=True)).iter_epoch()]
    np.testing.assert_array_equal(np.stack(piped), np.stack(local))


def test_version_1_and_packed_splits_stream_the_same_batches(tmp_path):
    """The plan depends on the documents' lengths and order only, so a version-1 split (a member per
    document) and a packed one of the same documents give bitwise the same batches, with workers
    too; packed members are read whole and cached, version-1 documents one by one."""
    lengths = np.random.default_rng(11).integers(5, 300, size=80)
    docs = synthetic_documents(lengths)
    config = ShardConfig(max_samples_per_shard=16, max_bytes_per_member=1500)
    write_shards(docs, tmp_path / "packed", split="train", special=SYNTHETIC_SPECIAL, config=config)
    write_shards_v1(docs, tmp_path / "v1", split="train", special=SYNTHETIC_SPECIAL, config=config)
    assert TokenStream(causal_config(tmp_path / "packed")).indices[0].members > 1
    for workers in (0, 2):
        packed, _ = rank_batches(causal_config(tmp_path / "packed", num_workers=workers), world=2)
        v1, _ = rank_batches(causal_config(tmp_path / "v1", num_workers=workers), world=2)
        for got, want in zip(packed, v1):
            np.testing.assert_array_equal(np.stack(got), np.stack(want))


def test_start_up_plans_from_the_index_without_parsing_a_tar(synthetic_shards, monkeypatch):
    root, _ = synthetic_shards
    expected = [batch_rows(b) for b in TokenStream(causal_config(root)).iter_epoch()]

    def refuse(*args, **kwargs):
        raise AssertionError("a tar was parsed")

    monkeypatch.setattr(tarfile, "open", refuse)
    monkeypatch.setattr(tarfile.TarFile, "getmembers", refuse)
    stream = TokenStream(causal_config(root))
    np.testing.assert_array_equal(np.stack([batch_rows(b) for b in stream.iter_epoch()]), np.stack(expected))


def test_one_dataloader_runs_across_epoch_boundaries_with_the_same_batches(synthetic_shards):
    """`for batch in stream` keeps its workers across epochs (no restart at the boundary); the
    batches are those of epoch after epoch, and a state saved inside epoch 1 resumes there."""
    root, _ = synthetic_shards
    by_epoch = TokenStream(causal_config(root))
    expected = [batch_rows(b) for _ in range(3) for b in by_epoch.iter_epoch()]
    stream = TokenStream(causal_config(root, num_workers=2, max_epochs=3))
    got, states = [], []
    for batch in stream:
        got.append(batch_rows(batch))
        states.append(stream.state_dict())
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    assert stream.epoch == 3 and stream.cursor == 0
    middle = len(expected) // 2
    resumed = TokenStream(causal_config(root, num_workers=1, max_epochs=3))
    resumed.load_state_dict(states[middle - 1])
    assert resumed.epoch == 1
    np.testing.assert_array_equal(np.stack([batch_rows(b) for b in resumed]), np.stack(expected[middle:]))


def test_a_state_saved_by_the_shuffle_buffer_planner_continues_with_a_warning(synthetic_shards):
    root, _ = synthetic_shards
    stream = TokenStream(causal_config(root))
    old = {  # what the release that planned epochs with a shuffle buffer saved
        "version": 1,
        "epoch": 2,
        "cursor": 8,
        "seed": 3,
        "raw_length": 17,
        "shuffle_shards": True,
        "shuffle_buffer": 1000,
        "manifest_fingerprint": stream.manifest.fingerprint,
        "skipped_shards": [],
    }
    with pytest.warns(RuntimeWarning, match="shuffle buffer: continuing at epoch 2, row 8"):
        stream.load_state_dict(old)
    assert (stream.epoch, stream.cursor) == (2, 8)
    with pytest.raises(ValueError, match="other data"):
        TokenStream(causal_config(root)).load_state_dict({**old, "manifest_fingerprint": "0" * 64})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before any warning
        with pytest.raises(ValueError, match="seed=4"):
            TokenStream(causal_config(root)).load_state_dict({**old, "seed": 4})


def test_resume_with_another_batch_size_and_world_size_continues_at_the_row(synthetic_shards):
    root, _ = synthetic_shards
    head, states = rank_batches(causal_config(root, batch_size=4), world=2, steps=3)
    tail, _ = rank_batches(causal_config(root, batch_size=3, num_workers=2), world=3, state=states[0])
    reference = reference_rows(causal_config(root))
    # Global order: batch i of rank r holds rows cursor + (i*W + r)*B ...
    first = [tuple(row) for i in range(3) for rank in range(2) for row in head[rank][i]]
    second = [tuple(row) for i in range(len(tail[0])) for rank in range(3) for row in tail[rank][i]]
    assert first + second == reference[: len(first) + len(second)]
    assert len(reference) - len(first) - len(second) < 3 * 3
