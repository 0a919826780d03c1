"""Pretraining objectives: pure functions from token ids (+ an explicit RNG) to model rows.

Axis legend: n = tokens of one packed row before the objective; L = model input length.

- `span_corruption` (T5): replace ~15% of the tokens (noise density) with spans of mean
  length 3; each span becomes one sentinel in the inputs, and the targets list each sentinel
  followed by the tokens it replaced. Counts are exact (not sampled), so for a given n the
  input and target lengths are fixed: `span_corruption_lengths(512)` = (568, 114), i.e. 568 raw
  tokens -> 512 inputs / 114 targets, computed for any input length as T5 does.
- `causal_lm`: n = L + 1 tokens -> inputs tokens[:-1], labels tokens[1:] (already shifted:
  the loss is plain cross-entropy of logits[t] against labels[t]).
- `masked_lm` (BERT): 15% of the ordinary tokens are chosen; of those 80% become <mask>, 10% a
  random ordinary token, 10% stay; labels are -100 except at chosen positions.

Sentinels and special ids come from `data.tokenizer.SpecialTokens`; nothing here hard-codes one.
"""

from __future__ import annotations

import functools

import numpy as np

from data.tokenizer import SpecialTokens

IGNORE_INDEX = -100  # label value the loss skips (torch.nn.functional.cross_entropy's default)
OBJECTIVES = ("span_corruption", "causal_lm", "masked_lm")


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` tokens: T5's rounding, clamped so that
    every span and every gap between spans is non-empty."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(round(num_noise / mean_noise_span_length))
    num_spans = min(max(num_spans, 1), num_noise, length - num_noise)
    return num_noise, num_spans


@functools.lru_cache(maxsize=64)
def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(raw tokens per row, target length) such that the inputs are exactly `inputs_length`.

    The largest n whose corrupted inputs (non-noise tokens + one sentinel per span + eos) fit in
    `inputs_length`; T5's `random_spans_helper`. Defaults: 512 -> (568, 114). A linear search,
    cached: `StreamConfig.raw_length` asks for it once per batch.
    """
    if inputs_length < 3:
        raise ValueError(f"span corruption needs inputs_length >= 3, got {inputs_length}")

    def lengths(n: int) -> tuple[int, int]:
        noise, spans = _noise_counts(n, noise_density, mean_noise_span_length)
        return n - noise + spans + 1, noise + spans + 1

    n = 2
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    return n, lengths(n)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `num_segments` non-empty segments that sum to `num_items`, uniformly at random."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate(([0], cuts, [num_items])))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean (length,) mask of noise tokens: alternating non-noise/noise spans, starting with
    non-noise, with exactly `_noise_counts` noise tokens and spans."""
    num_noise, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    span_lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise_span = np.tile([False, True], num_spans)
    return np.repeat(is_noise_span, span_lengths)


def span_corruption(
    tokens: np.ndarray,
    special: SpecialTokens,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one row (n,), both ending in eos.

    inputs  = kept tokens with noise span i replaced by sentinel i
    targets = sentinel 0, span 0 tokens, sentinel 1, span 1 tokens, ..., eos
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    noise = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    num_spans = int(np.count_nonzero(noise & ~np.concatenate(([False], noise[:-1]))))
    if num_spans > special.num_sentinels:
        raise ValueError(
            f"{num_spans} noise spans need more than the vocabulary's {special.num_sentinels} "
            "sentinels; shorten input_length or raise mean_noise_span_length"
        )
    eos = np.array([special.eos_id], dtype=np.int64)
    return (
        np.concatenate((_spans_to_sentinels(tokens, noise, special), eos)),
        np.concatenate((_spans_to_sentinels(tokens, ~noise, special), eos)),
    )


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, special: SpecialTokens) -> np.ndarray:
    """Replace each run of masked tokens by the next sentinel (0, 1, ...); keep unmasked tokens."""
    previous = np.concatenate(([False], mask[:-1]))
    first = mask & ~previous
    sentinels = special.vocab_size - np.cumsum(first)  # span k -> vocab_size - 1 - k
    out = np.where(first, sentinels, tokens)
    return out[~(mask & previous)]


def reconstruct_span_corruption(inputs: np.ndarray, targets: np.ndarray, special: SpecialTokens) -> np.ndarray:
    """Invert `span_corruption`: the original row from (inputs, targets). Raises if they disagree."""
    inputs, targets = np.asarray(inputs)[:-1], np.asarray(targets)[:-1]  # drop the eos
    target_sentinels = np.flatnonzero(special.is_sentinel(targets))
    spans = np.split(targets, target_sentinels)[1:]  # each starts with its sentinel
    out, span = [], 0
    for token in inputs.tolist():
        if token >= special.num_model_pieces:
            if span >= len(spans) or spans[span][0] != token:
                raise ValueError(f"sentinel {token} in the inputs has no matching target span")
            out.extend(spans[span][1:].tolist())
            span += 1
        else:
            out.append(token)
    if span != len(spans):
        raise ValueError(f"{len(spans) - span} target spans have no sentinel in the inputs")
    return np.asarray(out, dtype=np.int64)


def causal_lm(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a row of L + 1 tokens: labels are the inputs shifted by one."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens[:-1], tokens[1:]


def masked_lm(
    tokens: np.ndarray, special: SpecialTokens, rng: np.random.Generator, probability: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels): BERT masking of ordinary tokens (special ids and sentinels never chosen)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    first_ordinary = special.mask_id + 1
    ordinary = (tokens >= first_ordinary) & ~special.is_sentinel(tokens)
    chosen = ordinary & (rng.random(len(tokens)) < probability)
    labels = np.where(chosen, tokens, IGNORE_INDEX)
    action = rng.random(len(tokens))
    inputs = tokens.copy()
    inputs[chosen & (action < 0.8)] = special.mask_id
    random_slots = chosen & (action >= 0.8) & (action < 0.9)
    inputs[random_slots] = rng.integers(first_ordinary, special.num_model_pieces, size=int(random_slots.sum()))
    return inputs, labels
