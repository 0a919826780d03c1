"""Fixtures for the data-pipeline tests: a synthetic shard set and a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic import write_synthetic

from data.corpus import CorpusConfig, iter_documents
from data.tokenizer import TokenizerConfig, train_tokenizer


@pytest.fixture
def synthetic_shards(tmp_path) -> tuple[Path, list[np.ndarray]]:
    """60 documents of 5..300 tokens in 6 shards of 10."""
    lengths = np.random.default_rng(7).integers(5, 300, size=60)
    return tmp_path, write_synthetic(tmp_path, lengths, samples_per_shard=10)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 600-id unigram tokenizer trained on 40 stdlib modules (a few seconds)."""
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [d.text for d in iter_documents(CorpusConfig(max_documents=40))]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600, sample_lines=5000), out), out
