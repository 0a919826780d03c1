"""Helpers for the data-pipeline tests: tiny synthetic shard sets.

Synthetic documents hold globally unique token ids (10, 11, 12, ...), so every row a stream
yields tells exactly which tokens it carries: exactly-once checks are set arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.shards import ShardConfig, write_shards
from data.stream import StreamConfig, TokenStream
from data.tokenizer import SpecialTokens

FIRST_TOKEN = 10
# Large enough for unique ids (uint32 shards); sentinels sit far above every document token.
SYNTHETIC_SPECIAL = SpecialTokens(vocab_size=2**20, num_sentinels=100)


def synthetic_documents(lengths) -> list[np.ndarray]:
    """Documents with consecutive unique ids, of the given lengths."""
    docs, nxt = [], FIRST_TOKEN
    for n in lengths:
        docs.append(np.arange(nxt, nxt + n, dtype=np.int64))
        nxt += n
    return docs


def write_synthetic(out: Path, lengths, samples_per_shard: int) -> list[np.ndarray]:
    docs = synthetic_documents(lengths)
    write_shards(
        docs, out, split="train", special=SYNTHETIC_SPECIAL, config=ShardConfig(max_samples_per_shard=samples_per_shard)
    )
    return docs


def causal_config(manifest: Path | None, **overrides) -> StreamConfig:
    """Causal LM rows of 16 (+1) tokens: a row is input_ids plus the last label."""
    values = dict(manifest=None if manifest is None else str(manifest), objective="causal_lm", input_length=16)
    values.update(batch_size=4, seed=3)
    values.update(overrides)
    return StreamConfig(**values)


def batch_rows(batch) -> np.ndarray:
    """The packed raw rows of a causal-LM batch, (B, L + 1)."""
    return np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)


def rank_batches(config: StreamConfig, world: int, *, state: dict | None = None, steps: int | None = None):
    """Per rank, the list of its batches' raw rows (after loading `state`), up to `steps` each, and
    each rank's state after them: the rest of a split's current epoch, or a mixture's batches (a
    blend has no epochs: give `steps`)."""
    out, states = [], []
    for rank in range(world):
        stream = TokenStream(config, rank=rank, world_size=world)
        if state is not None:
            stream.load_state_dict(state)
        rows = []
        for batch in stream.iter_epoch() if stream.mixture is None else stream:
            rows.append(batch_rows(batch))
            if steps is not None and len(rows) == steps:
                break
        out.append(rows)
        states.append(stream.state_dict())
    return out, states
