"""benchmarks/scale_on_paper.py counts a shape's training flops as the library counts a built model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import scale_on_paper  # noqa: E402
from performer.config import preset  # noqa: E402
from performer.models import PerformerSeq2Seq, training_flops  # noqa: E402


@pytest.mark.parametrize("d_model,layers", [(128, 2), (256, 3)])
def test_the_analytic_count_matches_the_built_models(d_model, layers):
    vocab, input_tokens, target_tokens = 1000, 512, 128
    config = preset("tiny", vocab_size=vocab, d_model=d_model, num_encoder_layers=layers, num_decoder_layers=layers)
    built = training_flops(PerformerSeq2Seq(config), input_tokens, target_tokens)
    analytic = scale_on_paper.training_flops(d_model, layers, layers, vocab, input_tokens, target_tokens)
    assert analytic == pytest.approx(built, rel=0.02)  # the analytic count leaves out norms and biases
