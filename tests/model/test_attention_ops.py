"""Each fast attention op against its naive twin: values and gradients."""

import pytest
import torch

from performer.attention.favor import mask_keys
from performer.attention.naive import (
    causal_linear_attention,
    causal_linear_attention_quadratic,
    causal_linear_attention_recurrent,
    linear_attention,
    linear_attention_quadratic,
)
from performer.attention.softmax import softmax_attention
from performer.feature_maps import favor_features, gaussian_orthogonal_projection


def _inputs(batch=2, heads=3, length=37, head_dim=8, nb_features=20, key_length=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    key_length = key_length or length
    projection = gaussian_orthogonal_projection(nb_features, head_dim, seed=seed)
    q = torch.randn(batch, heads, length, head_dim, generator=generator, requires_grad=True)
    k = torch.randn(batch, heads, key_length, head_dim, generator=generator, requires_grad=True)
    v = torch.randn(batch, heads, key_length, head_dim, generator=generator, requires_grad=True)
    return q, k, v, projection


def _run(op, q, k, v, projection, key_padding=None, **kwargs):
    phi_q = favor_features(q, projection, is_query=True)
    phi_k, values = mask_keys(favor_features(k, projection, is_query=False), v, key_padding)
    out = op(phi_q, phi_k, values, **kwargs)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))
    return out.detach(), grads


def _assert_same(a, b, atol=2e-5):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.allclose(out_a, out_b, atol=atol, rtol=1e-4)
    for grad_a, grad_b, name in zip(grads_a, grads_b, "qkv"):
        assert torch.allclose(grad_a, grad_b, atol=atol, rtol=1e-3), f"d{name} differs"


@pytest.mark.parametrize("length", [1, 16, 37, 64])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 128])
def test_chunked_causal_equals_quadratic(length, chunk_size):
    q, k, v, projection = _inputs(length=length)
    _assert_same(
        _run(causal_linear_attention, q, k, v, projection, chunk_size=chunk_size),
        _run(causal_linear_attention_quadratic, q, k, v, projection),
    )


def _prompt_at_once(phi_q, phi_k, v, chunk_size):
    from performer.attention.favor import CausalLinearState, causal_linear_attention_step

    state = CausalLinearState.empty(phi_q.shape[0], phi_q.shape[1], phi_q.shape[-1], v.shape[-1], phi_q.device)
    return causal_linear_attention_step(phi_q, phi_k, v, state, chunk_size=chunk_size)[0]


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_prompt_fed_at_once_in_pieces_equals_quadratic(chunk_size):
    q, k, v, projection = _inputs(length=23)
    _assert_same(
        _run(_prompt_at_once, q, k, v, projection, chunk_size=chunk_size),
        _run(causal_linear_attention_quadratic, q, k, v, projection),
    )


@pytest.mark.parametrize("length", [5, 23])
def test_recurrent_step_equals_quadratic(length):
    q, k, v, projection = _inputs(length=length)
    _assert_same(
        _run(causal_linear_attention_recurrent, q, k, v, projection),
        _run(causal_linear_attention_quadratic, q, k, v, projection),
    )


def test_causal_with_key_padding_equals_quadratic():
    q, k, v, projection = _inputs(length=30)
    key_padding = torch.ones(2, 30, dtype=torch.bool)
    key_padding[0, 20:] = False
    key_padding[1, :3] = False  # left padding: the first queries see no key at all
    fast = _run(causal_linear_attention, q, k, v, projection, key_padding=key_padding, chunk_size=8)
    naive = _run(causal_linear_attention_quadratic, q, k, v, projection, key_padding=key_padding)
    _assert_same(fast, naive)
    assert torch.equal(fast[0][1, :, :3], torch.zeros_like(fast[0][1, :, :3]))


def test_bidirectional_equals_quadratic_with_cross_lengths():
    q, k, v, projection = _inputs(length=11, key_length=19)
    key_padding = torch.ones(2, 19, dtype=torch.bool)
    key_padding[1, 12:] = False
    _assert_same(
        _run(linear_attention, q, k, v, projection, key_padding=key_padding),
        _run(linear_attention_quadratic, q, k, v, projection, key_padding=key_padding),
    )


def test_no_key_gives_zeros_and_finite_gradients():
    q, k, v, projection = _inputs(length=6)
    nothing = torch.zeros(2, 6, dtype=torch.bool)
    out, grads = _run(linear_attention, q, k, v, projection, key_padding=nothing)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


def _naive_softmax(q, k, v, allowed):
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
    return weights @ v


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_attention_against_naive(causal):
    q, k, v, _ = _inputs(length=13)
    allowed = torch.rand(2, 13, 13, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed[0, 4] = False  # a query with no key
    full = allowed & (torch.ones(13, 13, dtype=torch.bool).tril() if causal else True)
    ours = softmax_attention(q, k, v, allowed, causal=causal)
    reference = _naive_softmax(q, k, v, full[:, None])
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.equal(ours[0, :, 4], torch.zeros_like(ours[0, :, 4]))
    grads = torch.autograd.grad(ours.sum(), (q, k, v))
    reference_grads = torch.autograd.grad(reference.sum(), (q, k, v))
    for ours_grad, reference_grad in zip(grads, reference_grads):
        assert torch.isfinite(ours_grad).all()
        assert torch.allclose(ours_grad, reference_grad, atol=1e-5)


def test_softmax_causal_decoding_query_sees_all_cached_keys():
    q, k, v, _ = _inputs(length=1, key_length=9)
    ours = softmax_attention(q, k, v, causal=True)
    assert torch.allclose(ours, _naive_softmax(q, k, v, torch.ones(1, 1, 1, 9, dtype=torch.bool)), atol=1e-6)
