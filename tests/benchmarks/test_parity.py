"""benchmarks/parity.py: it reads a prepared split as the documents it holds, joined by eos, and its
results table says only what its runs used."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import parity  # noqa: E402
from data.shards import ShardConfig, write_shards, write_shards_v1  # noqa: E402
from data.tokenizer import SpecialTokens  # noqa: E402

SPECIAL = SpecialTokens(vocab_size=600, num_sentinels=10)


def documents(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 590, size=int(n)) for n in rng.integers(1, 400, size=count)]


@pytest.mark.parametrize("writer", [write_shards, write_shards_v1], ids=["version-2", "version-1"])
def test_pack_joins_every_document_by_eos_and_nothing_else(tmp_path, writer):
    splits = {"train": documents(0, 40), "heldout": documents(1, 7)}
    for split, docs in splits.items():
        # Several documents per member pair and several shards: the lengths arrays a version-2
        # member pair holds beside its tokens must not be read as tokens.
        writer(docs, tmp_path / split, split=split, special=SPECIAL, config=ShardConfig(max_samples_per_shard=15))

    packed = parity.pack(tmp_path)

    for split, docs in splits.items():
        expected = np.concatenate([piece for doc in docs for piece in (doc, [SPECIAL.eos_id])])
        assert packed[split].dtype == np.uint16
        np.testing.assert_array_equal(packed[split], expected)
    assert parity.special_tokens(packed) == SPECIAL


def test_the_corpus_fingerprint_tells_corpora_apart(tmp_path):
    for split, seed in (("train", 0), ("heldout", 1)):
        write_shards(documents(seed, 12), tmp_path / split, split=split, special=SPECIAL)
    packed = parity.pack(tmp_path)
    changed = dict(packed, train=packed["train"].copy())
    changed["train"][7] += 1

    assert parity.corpus_fingerprint(packed) == parity.corpus_fingerprint(parity.pack(tmp_path))
    assert parity.corpus_fingerprint(changed) != parity.corpus_fingerprint(packed)


def results_of(*variants: str) -> dict:
    settings = {
        "device": "cpu",
        "steps_at_1024": 600,
        "tokens_per_step": 16384,
        "lr": 0.002,
        "redraw_interval": 100,
        "heldout_batches": 8,
        "nb_features": "round(D ln D) = 111",
    }
    records = [
        {"kind": "lm", "length": 1024, "variant": v, "final_heldout_loss": 3.5, "train_loss_last_50": 3.4}
        for v in variants
    ]
    return {"settings": settings, "records": records, "summary": {}}


@pytest.mark.parametrize(
    "variants,default_features,redraws",
    [
        (("softmax", "favor++@256"), False, None),
        (("softmax", "favor++"), True, None),
        (("favor@256", "favor-smooth@256", "favor++-redraw"), True, "(favor++-redraw, favor-smooth)"),
    ],
)
def test_the_table_names_the_default_features_and_the_redraw_interval_only_where_a_run_used_them(
    variants, default_features, redraws
):
    header = parity.markdown(results_of(*variants)).split("\n")[0]
    assert ("M = round(D ln D) = 111 features per head" in header) == default_features
    assert ("redraw every 100 steps" in header) == (redraws is not None)
    if redraws:
        assert f"redraw every 100 steps {redraws}" in header
