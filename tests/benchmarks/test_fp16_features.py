"""benchmarks/fp16_features.py: what it counts is what a 16-bit dtype does to key features, and
the reason the Triton kernels take bf16 operands holds on a small case."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import fp16_features  # noqa: E402


def test_the_shares_count_overflow_flushing_and_subnormals():
    features = torch.tensor([1e5, 1.0, 1e-6, 1e-9, 0.5])
    shares = fp16_features.feature_ranges(features, torch.float16)
    assert shares == pytest.approx({"overflow": 0.2, "flushed": 0.2, "subnormal": 0.2})
    assert fp16_features.feature_ranges(features, torch.bfloat16) == {"overflow": 0.0, "flushed": 0.0, "subnormal": 0.0}


def test_the_output_from_features_is_the_kernel_matrixs_and_padding_leaves_keys_out():
    phi_q, phi_k, v = torch.rand(1, 1, 3, 4), torch.rand(1, 1, 3, 4), torch.randn(1, 1, 3, 2)
    key_valid = torch.tensor([[True, False, True]])
    out, normaliser = fp16_features.attention_from_features(phi_q, phi_k, v, key_valid, causal=True)
    scores = (phi_q[0, 0].double() @ phi_k[0, 0].double().T).tril() * key_valid[0].double()
    torch.testing.assert_close(out[0, 0], scores @ v[0, 0].double() / scores.sum(-1, keepdim=True))
    torch.testing.assert_close(normaliser[0, 0], scores.sum(-1))


def test_gaussian_keys_at_head_dim_64_break_float16_and_not_bfloat16():
    record = fp16_features.measure_call(*fp16_features.gaussian_call(64, 128, 256, "favor+"))
    assert record["bfloat16"]["rows_lost"] == 0 and record["bfloat16"]["error_p99"] < 1e-2
    # A key whose feature overflows poisons every later causal row; the rest are off by tens of percent.
    assert record["float16"]["rows_lost"] > 0.1 and record["float16"]["error_median"] > 0.1
    row = fp16_features.summarise("gaussian", [record])
    assert row["decades"] > 12  # more than float16 spans, subnormals included
    # Even the best global shift (largest key feature at 2^15) leaves float16 tens of percent off.
    shifted = record["float16, best shift"]
    assert shifted["overflow"] == 0 and shifted["error_median"] > 0.1


@pytest.mark.parametrize(("causal", "query_length"), [(True, 24), (False, 24), (False, 9)])
def test_the_float32_reference_is_what_favor_attention_computes(causal, query_length):
    """The benchmark's reference (features of performer.feature_maps, the explicit kernel matrix)
    against the op the model runs: causal, bidirectional and cross attention, with padded keys."""
    from performer.attention.fused import favor_attention_torch
    from performer.feature_maps import favor_features, favorpp_default_a, gaussian_orthogonal_projection

    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, query_length, 16, generator=generator)
    k, v = (torch.randn(2, 3, 24, 16, generator=generator) for _ in range(2))
    projection, a = gaussian_orthogonal_projection(32, 16, seed=1), favorpp_default_a(16)
    key_valid = torch.ones(2, 24, dtype=torch.bool)
    key_valid[1, 17:] = False
    phi_q, phi_k = favor_features(q, projection, True, a), favor_features(k, projection, False, a)
    out, _ = fp16_features.attention_from_features(phi_q, phi_k, v, key_valid, causal)
    expected = favor_attention_torch(q, k, v, projection, key_valid, causal, None, a)
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-4)
