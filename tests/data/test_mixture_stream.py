"""The stream over weighted mixtures of splits, and shard verification shared by the ranks.

Two synthetic splits hold disjoint token ids, so every row tells which source it came from;
each source's rows in a blend must be exactly that source's own stream, in its order, epoch
after epoch (each epoch once), whatever the world size, the workers or a resume.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from synthetic import SYNTHETIC_SPECIAL, batch_rows, causal_config, rank_batches

from data.errors import DataError
from data.mixture import SourceConfig
from data.shards import ShardConfig, write_shards
from data.stream import StreamConfig, TokenStream

EOS = SYNTHETIC_SPECIAL.eos_id
SECOND_SOURCE_IDS = 500_000  # source b's ids start here; source a's stay below


def write_split(out, first_id, lengths, fingerprint=None):
    documents, nxt = [], first_id
    for n in lengths:
        documents.append(np.arange(nxt, nxt + n, dtype=np.int64))
        nxt += n
    write_shards(
        documents,
        out,
        split="train",
        special=SYNTHETIC_SPECIAL,
        config=ShardConfig(max_samples_per_shard=10),
        tokenizer_fingerprint=fingerprint,
    )
    return out


@pytest.fixture
def two_splits(tmp_path):
    a = write_split(tmp_path / "a" / "train", 10, np.random.default_rng(1).integers(5, 200, size=60))
    b = write_split(tmp_path / "b" / "train", SECOND_SOURCE_IDS, np.random.default_rng(2).integers(5, 40, size=20))
    return a, b


def mixture_config(a, b, weights=(3.0, 1.0), **overrides):
    sources = (SourceConfig(str(a), weights[0], "a"), SourceConfig(str(b), weights[1], "b"))
    return causal_config(None, sources=sources, **overrides)


def global_order(per_rank):
    """Rows in the blend's global order: batch i of rank r is global batch i*W + r."""
    world = len(per_rank)
    return [tuple(row) for i in range(len(per_rank[0])) for r in range(world) for row in per_rank[r][i]]


def own_stream_rows(split, count, **overrides):
    """The first `count` rows of one split's own stream over its epochs (one rank, batches of 1)."""
    stream = TokenStream(causal_config(split, batch_size=1, **overrides))
    rows = []
    for batch in stream:
        rows.append(tuple(batch_rows(batch)[0]))
        if len(rows) == count:
            return rows


def source_of(row) -> str:
    tokens = np.array(row)
    tokens = tokens[tokens != EOS]
    assert np.all(tokens >= SECOND_SOURCE_IDS) or np.all(tokens < SECOND_SOURCE_IDS)
    return "b" if tokens[0] >= SECOND_SOURCE_IDS else "a"


@pytest.mark.parametrize("workers", [0, 2], ids=lambda w: f"workers{w}")
def test_each_source_streams_its_own_epochs_in_order_at_the_weights(two_splits, workers):
    a, b = two_splits
    config = mixture_config(a, b, num_workers=workers)
    per_rank, states = rank_batches(config, world=2, steps=40)  # 320 rows: several epochs of b
    rows = global_order(per_rank)
    by_source = {"a": [r for r in rows if source_of(r) == "a"], "b": [r for r in rows if source_of(r) == "b"]}
    # Each source's rows are its own stream's, in order, across its epoch boundaries: nothing
    # repeated within an epoch, nothing skipped.
    for name, split in (("a", a), ("b", b)):
        assert by_source[name] == own_stream_rows(split, len(by_source[name]))
    assert TokenStream(causal_config(b)).rows_per_epoch * 2 < len(by_source["b"])  # b went round twice
    # The weights (3:1), and the counts the stream reports from its cursor alone.
    assert abs(len(by_source["a"]) / len(rows) - 0.75) < 0.05
    stream = TokenStream(config, rank=0, world_size=2)
    stream.load_state_dict(states[0])
    assert stream.source_rows() == {"a": len(by_source["a"]), "b": len(by_source["b"])}
    assert states[0] == states[1] and states[0]["cursor"] == len(rows) and states[0]["epoch"] == 0


def test_a_mixture_resumes_exactly_and_with_another_world_size(two_splits):
    a, b = two_splits
    config = mixture_config(a, b, num_workers=1)
    full, _ = rank_batches(config, world=2, steps=12)
    head, states = rank_batches(config, world=2, steps=5)
    state = json.loads(json.dumps(states[0]))
    tail, _ = rank_batches(config, world=2, steps=7, state=state)
    for rank in range(2):
        np.testing.assert_array_equal(np.stack(head[rank] + tail[rank]), np.stack(full[rank]))
    # 2 ranks -> 3 ranks: the blend continues at the global cursor, none repeated, none skipped.
    three, _ = rank_batches(config, world=3, steps=4, state=state)
    reference = global_order(rank_batches(config, world=1, steps=(5 * 2 + 4 * 3) * 4 // 4)[0])
    assert global_order(head) + global_order(three) == reference[: len(global_order(head) + global_order(three))]


def test_span_corruption_rows_of_a_mixture_are_seeded_by_their_source_row(two_splits):
    a, b = two_splits
    sources = (SourceConfig(str(a), 1.0, "a"), SourceConfig(str(b), 1.0, "b"))
    config = StreamConfig(sources=sources, objective="span_corruption", input_length=32, batch_size=4, seed=3)
    first = [b_["input_ids"].numpy() for _, b_ in zip(range(3), TokenStream(config))]
    again = [b_["input_ids"].numpy() for _, b_ in zip(range(3), TokenStream(config))]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))


def test_mixture_errors_name_the_problem(two_splits, tmp_path):
    a, b = two_splits
    with pytest.raises(DataError, match="weights must be positive"):
        mixture_config(a, b, weights=(1.0, 0.0))
    with pytest.raises(DataError, match="not both or neither"):
        causal_config(a, sources=(SourceConfig(str(b)),))
    with pytest.raises(DataError, match="not both or neither"):
        causal_config(None)
    other = write_split(tmp_path / "c" / "train", 10, [20] * 12, fingerprint="f" * 64)
    with pytest.raises(DataError, match="another tokenizer.*prepare every source with one tokenizer"):
        TokenStream(mixture_config(a, other))
    same_name = causal_config(None, sources=(SourceConfig(str(a)), SourceConfig(str(a / "manifest.json"))))
    with pytest.raises(DataError, match="distinct `name`"):
        TokenStream(same_name)
    stream = TokenStream(mixture_config(a, b))
    with pytest.raises(DataError, match="no epochs"):
        stream.steps_per_epoch
    state = stream.state_dict()
    with pytest.raises(DataError, match="sources"):
        TokenStream(mixture_config(a, b, weights=(1.0, 1.0))).load_state_dict(state)


# ------------------------------------------------------------------------ verification, shared


def threaded_ranks(world, build):
    """Run build(rank, gather) on `world` threads with a gather that exchanges objects like
    all_gather_object; the results (or exceptions) per rank."""
    barrier, shared, results = threading.Barrier(world), [None] * world, [None] * world

    def gather(value):
        rank = int(threading.current_thread().name)
        shared[rank] = value
        barrier.wait()
        out = list(shared)
        barrier.wait()
        return out

    def run(rank):
        try:
            results[rank] = build(rank, gather)
        except Exception as error:  # noqa: BLE001 - handed back to the test
            results[rank] = error

    threads = [threading.Thread(target=run, args=(r,), name=str(r)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_each_rank_verifies_a_share_and_all_act_on_every_verdict(two_splits, monkeypatch):
    a, _ = two_splits
    manifest = json.loads((a / "manifest.json").read_text())
    paths = [shard["path"] for shard in manifest["shards"]]
    (a / paths[1]).unlink()  # missing
    with open(a / paths[4], "r+b") as handle:  # truncated
        handle.truncate(1000)
    import data.shards

    hashed = []
    real = data.shards.sha256_file
    monkeypatch.setattr(data.shards, "sha256_file", lambda path, *args: hashed.append(str(path)) or real(path, *args))
    with pytest.warns(RuntimeWarning, match="skipping corrupt shard"):
        streams = threaded_ranks(
            2, lambda rank, gather: TokenStream(causal_config(a), rank=rank, world_size=2, gather=gather)
        )
    assert all(isinstance(s, TokenStream) for s in streams), streams
    assert streams[0].bad_shards.keys() == streams[1].bad_shards.keys() == {paths[1], paths[4]}
    assert "unreadable" in streams[0].bad_shards[paths[1]] and "size" in streams[1].bad_shards[paths[4]]
    # Each shard of the right size hashed once in all (plus the index files), not once per rank.
    shard_hashes = [p for p in hashed if p.endswith(".tar")]
    assert sorted(shard_hashes) == sorted({str(a / p) for p in paths} - {str(a / paths[1]), str(a / paths[4])})
    # Both ranks plan the same epoch and deal it equally.
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch > 0


def test_a_checksum_mismatch_found_by_one_rank_stops_every_rank(two_splits):
    a, _ = two_splits
    manifest = json.loads((a / "manifest.json").read_text())
    victim = a / manifest["shards"][3]["path"]  # verified by rank 1 of 2 (positions 1, 3, 5)
    data = bytearray(victim.read_bytes())
    data[-600] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    outcomes = threaded_ranks(
        2, lambda rank, gather: TokenStream(causal_config(a), rank=rank, world_size=2, gather=gather)
    )
    for outcome in outcomes:
        assert isinstance(outcome, DataError) and "sha256" in str(outcome) and "verify_sha256=false" in str(outcome)


def test_a_mixture_resumes_with_another_batch_size(two_splits):
    a, b = two_splits
    head, states = rank_batches(mixture_config(a, b, batch_size=4), world=2, steps=3)
    tail, _ = rank_batches(mixture_config(a, b, batch_size=3), world=3, steps=4, state=states[0])
    reference = global_order(rank_batches(mixture_config(a, b, batch_size=1), world=1, steps=24 + 36)[0])
    assert global_order(head) + global_order(tail) == reference


def test_shards_another_rank_found_bad_are_left_out_by_label(two_splits):
    a, b = two_splits
    stream = TokenStream(mixture_config(a, b))
    paths = [shard.path for shard in stream.sources[0].manifest.shards]
    before = stream.sources[0].order.rows
    with pytest.warns(RuntimeWarning, match=f"skipping corrupt shard a:{paths[0]}"):
        stream.exclude_shards({f"a:{paths[0]}": "truncated on rank 3"})
    assert stream.bad_shards == {f"a:{paths[0]}": "truncated on rank 3"}
    assert stream.sources[0].order.rows < before and stream.sources[1].bad == {}
    assert 0 not in stream.sources[0].indices
    with pytest.raises(DataError, match="all 6 shards of .* failed verification"):
        with pytest.warns(RuntimeWarning):
            stream.exclude_shards({f"a:{path}": "gone" for path in paths})
