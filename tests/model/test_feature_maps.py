"""FAVOR+ features: projections, exactness of the stabiliser, approximation of the softmax kernel."""

import math

import pytest
import torch

from performer.feature_maps import (
    KEY_FEATURE_HEADROOM,
    default_nb_features,
    derive_seed,
    favor_features,
    gaussian_orthogonal_projection,
)


def test_default_nb_features_is_d_ln_d():
    assert default_nb_features(64) == round(64 * math.log(64)) == 266
    assert default_nb_features(16) == 44


def test_projection_blocks_are_orthogonal_with_chi_norms():
    projection = gaussian_orthogonal_projection(150, 64, seed=3).double()
    block = projection[:64]
    directions = block / block.norm(dim=1, keepdim=True)
    assert torch.allclose(directions @ directions.T, torch.eye(64, dtype=torch.float64), atol=1e-5)
    # Row norms follow chi(64): mean close to sqrt(64 - 1/2).
    assert abs(projection.norm(dim=1).mean().item() - math.sqrt(63.5)) < 0.5


def test_projection_is_a_pure_function_of_the_seed():
    a = gaussian_orthogonal_projection(40, 16, seed=derive_seed(7, 2, 5))
    b = gaussian_orthogonal_projection(40, 16, seed=derive_seed(7, 2, 5))
    c = gaussian_orthogonal_projection(40, 16, seed=derive_seed(7, 2, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert derive_seed(1, 2, 3) != derive_seed(1, 3, 2)


def _naive_features(x, projection):
    """phi(x) = exp(w.x - |x|^2/2) / sqrt(M) in float64, after the D^-1/4 scaling, no stabiliser."""
    x = x.double() * x.shape[-1] ** -0.25
    w = projection.double()
    return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])


def test_features_equal_the_textbook_map_up_to_per_query_and_per_feature_constants():
    projection = gaussian_orthogonal_projection(32, 8, seed=1)
    q, k = torch.randn(5, 8), torch.randn(6, 8)
    exact = _naive_features(q, projection) @ _naive_features(k, projection).T  # (5, 6) kernel
    ours = (
        favor_features(q, projection, is_query=True).double() @ favor_features(k, projection, is_query=False).double().T
    )
    # Each query row is scaled by one positive constant: row-normalised kernels agree.
    assert torch.allclose(ours / ours.sum(1, keepdim=True), exact / exact.sum(1, keepdim=True), rtol=1e-4)


def test_features_are_positive_bounded_and_key_features_depend_on_their_key_only():
    projection = gaussian_orthogonal_projection(64, 16, seed=2)
    keys = torch.randn(10, 16)
    huge = keys.clone()
    huge[3] *= 1e4  # one extreme key
    phi, phi_huge = favor_features(keys, projection, False), favor_features(huge, projection, False)
    assert (phi > 0).all()
    assert torch.isfinite(phi_huge).all()
    assert phi_huge.max() <= math.exp(KEY_FEATURE_HEADROOM) / 8 + 1e-3
    others = torch.arange(10) != 3
    assert torch.equal(phi[others], phi_huge[others])


def test_gradients_of_features_match_float64_reference():
    projection = gaussian_orthogonal_projection(24, 8, seed=4)
    q = torch.randn(3, 8, dtype=torch.float32, requires_grad=True)
    k = torch.randn(4, 8, dtype=torch.float32, requires_grad=True)
    kernel = favor_features(q, projection, True) @ favor_features(k, projection, False).T
    (kernel / kernel.sum(1, keepdim=True)).square().sum().backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    reference = _naive_features(q64, projection) @ _naive_features(k64, projection).T
    (reference / reference.sum(1, keepdim=True)).square().sum().backward()
    assert torch.allclose(q.grad.double(), q64.grad, rtol=1e-3, atol=1e-5)
    assert torch.allclose(k.grad.double(), k64.grad, rtol=1e-3, atol=1e-5)


def _attention_error(nb_features: int, seed: int, orthogonal: bool) -> float:
    generator = torch.Generator().manual_seed(1000 + seed)
    q = torch.randn(64, 16, generator=generator) * 0.5
    k = torch.randn(64, 16, generator=generator) * 0.5
    v = torch.randn(64, 16, generator=generator)
    exact = torch.softmax(q @ k.T / 4.0, dim=-1) @ v
    projection = gaussian_orthogonal_projection(nb_features, 16, seed=seed, orthogonal=orthogonal)
    kernel = favor_features(q, projection, True) @ favor_features(k, projection, False).T
    approx = (kernel / kernel.sum(1, keepdim=True)) @ v
    return ((approx - exact).norm() / exact.norm()).item()


def test_error_falls_as_nb_features_grows():
    errors = {m: sum(_attention_error(m, s, True) for s in range(8)) / 8 for m in (16, 64, 256, 1024)}
    assert errors[16] > errors[64] > errors[256] > errors[1024]
    assert errors[1024] < 0.5 * errors[64]


@pytest.mark.parametrize("nb_features", [16, 64])
def test_orthogonal_features_beat_iid_on_average(nb_features):
    seeds = range(40)
    orthogonal = sum(_attention_error(nb_features, s, True) for s in seeds)
    iid = sum(_attention_error(nb_features, s, False) for s in seeds)
    assert orthogonal < iid
