"""Objectives: T5 span-corruption lengths and invariants, causal and masked LM."""

from __future__ import annotations

import numpy as np
import pytest

from data.objectives import (
    IGNORE_INDEX,
    causal_lm,
    masked_lm,
    random_spans_noise_mask,
    reconstruct_span_corruption,
    span_corruption,
    span_corruption_lengths,
)
from data.tokenizer import SpecialTokens

SPECIAL = SpecialTokens(vocab_size=8000)


def test_t5_default_lengths():
    assert span_corruption_lengths(512) == (568, 114)


@pytest.mark.parametrize("inputs_length", [8, 64, 128, 512, 1024, 1536])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_span_corruption_invariants(inputs_length, seed):
    raw, targets_length = span_corruption_lengths(inputs_length)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(SPECIAL.mask_id + 1, SPECIAL.num_model_pieces, size=raw)
    inputs, targets = span_corruption(tokens, SPECIAL, rng)
    # Exact, fixed lengths, ending in eos.
    assert len(inputs) == inputs_length and len(targets) == targets_length
    assert inputs[-1] == SPECIAL.eos_id and targets[-1] == SPECIAL.eos_id
    # Inputs + targets reconstruct the original row.
    np.testing.assert_array_equal(reconstruct_span_corruption(inputs, targets, SPECIAL), tokens)
    # Sentinels appear in order 0, 1, 2, ... (ids counting down from the top) in both.
    in_sentinels = inputs[SPECIAL.is_sentinel(inputs)]
    out_sentinels = targets[SPECIAL.is_sentinel(targets)]
    expected = SPECIAL.sentinel_ids()[: len(in_sentinels)]
    np.testing.assert_array_equal(in_sentinels, expected)
    np.testing.assert_array_equal(out_sentinels, expected)
    assert targets[0] == SPECIAL.sentinel_id(0)  # targets start with the first sentinel
    # Noise is ~15% of the row.
    noise_tokens = targets_length - 1 - len(out_sentinels)
    assert abs(noise_tokens / raw - 0.15) < 0.02 + 1 / raw


def test_noise_mask_is_seeded_and_varies():
    mask = lambda seed: random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(seed))  # noqa: E731
    np.testing.assert_array_equal(mask(5), mask(5))
    assert not np.array_equal(mask(5), mask(6))
    assert not mask(5)[0]  # the row starts with kept tokens, as in T5
    assert mask(5).sum() == 85


def test_too_many_spans_for_the_sentinels_is_an_error():
    few = SpecialTokens(vocab_size=8000, num_sentinels=5)
    with pytest.raises(ValueError, match="sentinels"):
        span_corruption(np.arange(10, 578), few, np.random.default_rng(0))


def test_causal_lm_shifts():
    inputs, labels = causal_lm(np.arange(10, 20))
    np.testing.assert_array_equal(inputs, np.arange(10, 19))
    np.testing.assert_array_equal(labels, np.arange(11, 20))


def test_masked_lm():
    rng = np.random.default_rng(0)
    tokens = rng.integers(SPECIAL.mask_id + 1, SPECIAL.num_model_pieces, size=20000)
    tokens[::50] = SPECIAL.eos_id
    inputs, labels = masked_lm(tokens, SPECIAL, rng)
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.mean() - 0.15) < 0.01
    np.testing.assert_array_equal(labels[chosen], tokens[chosen])
    assert not chosen[::50].any()  # special ids are never chosen
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
    masked = inputs[chosen] == SPECIAL.mask_id
    assert abs(masked.mean() - 0.8) < 0.03
    assert inputs.max() < SPECIAL.num_model_pieces  # random replacements are ordinary tokens
