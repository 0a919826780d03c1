"""The fused FAVOR+ / FAVOR++ op (features inside, hand-written backward) against the naive twins: values and
gradients, every test once per feature map."""

import pytest
import torch
from favor_twins import naive, output_and_grads

from performer.attention import fused
from performer.attention.fused import favor_attention
from performer.feature_maps import favorpp_default_a, gaussian_orthogonal_projection


@pytest.fixture(autouse=True, params=["kept", "recomputed"])
def operand_policy(request, monkeypatch):
    """Every test runs twice: the backward reusing the forward's features, and recomputing them."""
    if request.param == "recomputed":
        monkeypatch.setattr(fused, "KEPT_OPERANDS_BYTES", 0)
    return request.param


@pytest.fixture(params=["favor+", "favor++"])
def a(request):
    """The feature map: FAVOR+ (no A) or FAVOR++ with the default A of the test head dim, 8."""
    return None if request.param == "favor+" else favorpp_default_a(8)


def _inputs(batch=2, heads=3, length=37, head_dim=8, nb_features=20, key_length=None, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    key_length = key_length or length
    projection = gaussian_orthogonal_projection(nb_features, head_dim, seed=seed)

    def leaf(size):
        return torch.randn(batch, heads, size, head_dim, generator=generator).to(dtype).requires_grad_()

    return leaf(length), leaf(key_length), leaf(key_length), projection


def _fused(q, k, v, projection, key_padding=None, causal=False, chunk_size=None, a=None):
    out = favor_attention(q, k, v, projection, key_padding, causal, chunk_size, feature_a=a)
    return output_and_grads(out, (q, k, v))


def _assert_same(a, b, atol=2e-5, rtol=1e-4):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    for grad_a, grad_b, name in zip(grads_a, grads_b, "qkv"):
        torch.testing.assert_close(grad_a, grad_b, atol=atol, rtol=rtol * 10, msg=f"d{name} differs")


@pytest.mark.parametrize("length", [1, 16, 37, 130])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 256])
def test_causal_equals_quadratic(length, chunk_size, a):
    q, k, v, projection = _inputs(length=length)
    _assert_same(
        _fused(q, k, v, projection, causal=True, chunk_size=chunk_size, a=a),
        naive(q, k, v, projection, causal=True, a=a),
    )


@pytest.mark.parametrize(("length", "key_length"), [(1, 1), (37, 37), (5, 29), (40, 3)])
def test_bidirectional_equals_quadratic(length, key_length, a):
    q, k, v, projection = _inputs(length=length, key_length=key_length)
    _assert_same(_fused(q, k, v, projection, a=a), naive(q, k, v, projection, a=a))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padded_keys_equal_naive_and_get_zero_gradient(causal, a):
    q, k, v, projection = _inputs(length=33)
    key_padding = torch.rand(2, 33, generator=torch.Generator().manual_seed(3)) > 0.4
    fused_result = _fused(q, k, v, projection, key_padding, causal, chunk_size=8, a=a)
    _assert_same(fused_result, naive(q, k, v, projection, key_padding, causal, a=a))
    padded = ~key_padding[:, None, :, None]
    for grad in fused_result[1][1:]:
        assert torch.equal(grad.masked_select(padded), torch.zeros_like(grad.masked_select(padded)))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_garbage_in_padded_keys_cannot_leak(causal, a):
    q, k, v, projection = _inputs(length=12)
    key_padding = torch.ones(2, 12, dtype=torch.bool)
    key_padding[:, -4:] = False
    with torch.no_grad():
        k[:, :, -4:] = float("nan")
        v[:, :, -4:] = float("inf")
    out, grads = _fused(q, k, v, projection, key_padding, causal, a=a)
    assert torch.isfinite(out).all() and all(torch.isfinite(grad).all() for grad in grads)


def test_query_with_no_key_gets_zero_output_and_gradient(a):
    q, k, v, projection = _inputs(length=9)
    key_padding = torch.ones(2, 9, dtype=torch.bool)
    key_padding[1] = False  # the second sequence has no key at all
    out, grads = _fused(q, k, v, projection, key_padding, causal=True, a=a)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert all(torch.equal(grad[1], torch.zeros_like(grad[1])) for grad in grads)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_slice_groups_do_not_change_results(monkeypatch, causal, a):
    q, k, v, projection = _inputs(batch=3, heads=2, length=40)
    key_padding = torch.rand(3, 40, generator=torch.Generator().manual_seed(1)) > 0.2
    whole = _fused(q, k, v, projection, key_padding, causal, chunk_size=8, a=a)
    monkeypatch.setattr(fused, "GROUP_WORKING_SET_BYTES", 1)  # one (batch, head) slice per group
    _assert_same(_fused(q, k, v, projection, key_padding, causal, chunk_size=8, a=a), whole, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_bfloat16_inputs_keep_dtype_and_follow_float32(causal, a):
    q, k, v, projection = _inputs(length=64, dtype=torch.bfloat16)
    out, grads = _fused(q, k, v, projection, causal=causal, a=a)
    assert out.dtype == torch.bfloat16 and all(grad.dtype == torch.bfloat16 for grad in grads)
    reference = naive(*(x.detach().float().requires_grad_() for x in (q, k, v)), projection, causal=causal, a=a)
    torch.testing.assert_close(out.float(), reference[0], atol=3e-2, rtol=3e-2)


def test_causal_needs_square_attention(a):
    q, k, v, projection = _inputs(length=5, key_length=7)
    with pytest.raises(ValueError, match="as many queries as keys"):
        favor_attention(q, k, v, projection, causal=True, feature_a=a)
