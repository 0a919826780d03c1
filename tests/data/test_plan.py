"""The O(shards) epoch order (data/plan.py) and the mixture's row assignment (data/mixture.py),
checked on their own, without files: every document once per epoch, windows that draw from all
their shards, random access equal to sequential building, exact mixture shares."""

from __future__ import annotations

import numpy as np
import pytest

from data.errors import DataError
from data.mixture import PERIOD, Mixture, quotas
from data.plan import BLOCK_TOKENS, ShardSizes, SplitOrder


def make_order(documents_per_shard, *, seed=0, interleave=4, shuffle=True, raw_length=17, lengths_seed=1, skip=()):
    """A SplitOrder over synthetic shards (document lengths drawn per shard); shards at `skip` are
    left out (bad), so positions have holes like a real split's."""
    rng = np.random.default_rng(lengths_seed)
    lengths = {p: rng.integers(1, 60, size=n).astype(np.uint32) for p, n in enumerate(documents_per_shard)}
    good = [p for p in lengths if p not in skip]
    sizes = ShardSizes(
        positions=np.array(good, dtype=np.int64),
        documents=np.array([len(lengths[p]) for p in good], dtype=np.int64),
        tokens=np.array([int(lengths[p].sum()) for p in good], dtype=np.int64),
    )
    order = SplitOrder(
        sizes, lengths.__getitem__, seed=seed, raw_length=raw_length, interleave_shards=interleave, shuffle=shuffle
    )
    return order, lengths, good


def whole_epoch(order, epoch):
    """Every window of the epoch, in order, concatenated: (shard, document, length, start)."""
    windows = [order.window(epoch, w) for w in range(order.layout(epoch).windows)]
    return [np.concatenate([getattr(w, name) for w in windows]) for name in ("shard", "document", "length", "start")]


@pytest.mark.parametrize("interleave", [1, 3, 32])
def test_every_document_once_per_epoch_with_consistent_offsets(interleave):
    order, lengths, good = make_order([50, 7, 120, 1, 33, 64, 9, 80], interleave=interleave, skip=(3,))
    for epoch in (0, 1):
        shard, document, length, start = whole_epoch(order, epoch)
        pairs = set(zip(shard.tolist(), document.tolist()))
        assert len(pairs) == len(shard) == sum(len(lengths[p]) for p in good)
        assert pairs == {(p, d) for p in good for d in range(len(lengths[p]))}
        np.testing.assert_array_equal(length, [lengths[s][d] for s, d in zip(shard, document)])
        # Each document starts where the previous one (and its eos) ended, across windows too.
        np.testing.assert_array_equal(start, np.concatenate(([0], np.cumsum(length + 1)[:-1])))
        assert start[-1] + length[-1] + 1 == order.total_tokens and order.rows == order.total_tokens // 17


def test_windows_interleave_their_shards_and_read_each_block_by_block():
    # 8 shards of 400 documents, windows of 4: every stretch of 40 documents of a window already
    # holds documents of all 4 of its shards (a shard-by-shard order would hold 1).
    order, _, _ = make_order([400] * 8, interleave=4)
    for w in range(2):
        window = order.window(0, w)
        assert len(set(window.shard.tolist())) == 4
        for first in range(0, len(window) - 40, 40):
            assert len(set(window.shard[first : first + 40].tolist())) == 4
    # Blocks: long documents so that a shard spans several blocks; inside the stream, a shard's
    # documents come block after block (never back to a block it left).
    big = SplitOrder(
        ShardSizes(np.arange(2), np.array([300, 300]), np.array([300 * 5000] * 2)),
        lambda p: np.full(300, 5000, dtype=np.uint32),
        seed=0,
        raw_length=100,
        interleave_shards=2,
    )
    window = big.window(0, 0)
    for p in range(2):
        blocks = (window.document[window.shard == p] * 5000) // BLOCK_TOKENS
        changes = blocks[np.flatnonzero(np.diff(blocks)) + 1]
        assert len(set(changes.tolist())) == len(changes) and len(np.unique(blocks)) > 2
        assert not np.array_equal(np.sort(window.document[window.shard == p]), window.document[window.shard == p])


def test_the_order_is_a_pure_function_of_seed_and_epoch_whatever_is_built_first():
    sizes = [30, 70, 5, 90, 44, 12, 61]
    sequential, _, _ = make_order(sizes, interleave=2)
    reference = whole_epoch(sequential, 1)
    random_access, _, _ = make_order(sizes, interleave=2)
    for w in (3, 0, 2, 1):  # other windows, another order, another epoch in between
        random_access.window(1, w)
        random_access.window(0, w)
    for got, want in zip(whole_epoch(random_access, 1), reference):
        np.testing.assert_array_equal(got, want)
    epoch0, other_seed = whole_epoch(sequential, 0), whole_epoch(make_order(sizes, interleave=2, seed=5)[0], 1)
    assert not np.array_equal(epoch0[0], reference[0]) or not np.array_equal(epoch0[1], reference[1])
    assert not np.array_equal(other_seed[1], reference[1])
    # shuffle=False: the split's own order, shard after shard.
    plain, lengths, _ = make_order(sizes, interleave=3, shuffle=False)
    shard, document, _, _ = whole_epoch(plain, 4)
    np.testing.assert_array_equal(shard, np.repeat(np.arange(len(sizes)), sizes))
    np.testing.assert_array_equal(document, np.concatenate([np.arange(n) for n in sizes]))


def test_documents_cover_a_token_range_and_the_cache_stays_bounded():
    order, _, _ = make_order([40] * 12, interleave=2)
    shard, document, length, start = whole_epoch(order, 0)
    for begin, end in [(0, 17), (500, 1700), (order.total_tokens - 40, order.total_tokens), (1, 2)]:
        found = [
            (int(w.shard[i]), int(w.document[i])) for w, a, b in order.documents(0, begin, end) for i in range(a, b)
        ]
        want = [(int(s), int(d)) for s, d, n, t in zip(shard, document, length, start) if t < end and t + n + 1 > begin]
        assert found == want
    assert len(order._windows) <= order.cached_windows and len(order._layouts) <= 3
    # The last window of an epoch prepares the next epoch's first: no wait at the boundary.
    order.window(3, order.layout(3).windows - 1)
    assert (4, 0) in order._windows


def test_mixture_quotas_are_exact_and_every_source_is_read_in_order():
    assert quotas([0.7, 0.3]).tolist() == [round(0.7 * PERIOD), PERIOD - round(0.7 * PERIOD)]
    assert quotas([1e-9, 1.0]).min() == 1 and quotas([1, 1, 1]).sum() == PERIOD
    mixture = Mixture([3.0, 1.0, 0.5], seed=7, period=64)
    rows = 64 * 5 + 17
    source, row = mixture.assign(0, rows)
    assert np.bincount(source, minlength=3).tolist() == mixture.counts(rows).tolist()
    for s in range(3):  # each source's rows 0, 1, 2, ... in order: each of its epochs once, in its order
        np.testing.assert_array_equal(row[source == s], np.arange(int((source == s).sum())))
    # Shares within a period, exact over whole periods.
    assert abs(mixture.counts(64 * 5)[0] / (64 * 5) - 3 / 4.5) < 1 / 64
    # Any slice is the same as computed from the start (what a resumed rank computes).
    again = Mixture([3.0, 1.0, 0.5], seed=7, period=64).assign(100, 150)
    np.testing.assert_array_equal(again[0], source[100:250])
    np.testing.assert_array_equal(again[1], row[100:250])
    assert not np.array_equal(Mixture([3.0, 1.0, 0.5], seed=8, period=64).assign(0, rows)[0], source)


@pytest.mark.parametrize("weights", [[1.0, 0.0], [1.0, -2.0], [float("nan"), 1.0], []])
def test_mixture_weights_must_be_positive(weights):
    with pytest.raises(DataError, match="positive"):
        Mixture(weights, seed=0)


def test_a_split_of_one_shard_is_mixed_from_all_its_blocks():
    """Fewer shards than interleave_shards: each shard's blocks are cut into runs that are merged,
    so the stream does not walk a small split block after block."""
    order = SplitOrder(
        ShardSizes(np.arange(1), np.array([600]), np.array([600 * 5000])),
        lambda p: np.full(600, 5000, dtype=np.uint32),
        seed=0,
        raw_length=100,
        interleave_shards=32,
    )
    window = order.window(0, 0)
    blocks = window.document * 5000 // BLOCK_TOKENS
    assert len(np.unique(blocks)) == 6
    for first in range(0, 600 - 60, 60):  # every tenth of the epoch holds documents of every block
        assert len(np.unique(blocks[first : first + 60])) == 6
    assert sorted(window.document.tolist()) == list(range(600))
