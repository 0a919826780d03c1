"""FAVOR++ (optimised positive random features): the estimator, the stabilised features, the parameter A
as a buffer (default, calibration, casts, redraws, exports) and the config switch.

The fused op against its naive twin, causality, padding, bf16 and cached decoding run once per feature
map in test_fused_attention.py, test_invariants.py and test_models.py.
"""

import math

import pytest
import torch

import performer
from performer import PerformerDecoder
from performer.attention.fused import favor_attention
from performer.attention.module import Attention
from performer.config import ModelConfig, preset
from performer.feature_maps import (
    KEY_FEATURE_HEADROOM,
    SCALE_HEADROOM,
    default_nb_features,
    favor_features,
    favorpp_default_a,
    favorpp_optimal_a,
    favorpp_rho,
    gaussian_orthogonal_projection,
)
from performer.models import build_model, load_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _textbook(x, w, a):
    """The paper's f(w, x) = D0 exp(A|w|^2 + B w.x - |x|^2/2) / sqrt(M), float64, x already scaled."""
    x, w = x.double(), w.double()
    b, d0 = math.sqrt(1 - 4 * a), (1 - 4 * a) ** (x.shape[-1] / 4)
    exponent = a * (w * w).sum(-1) + b * x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
    return d0 * torch.exp(exponent) / math.sqrt(w.shape[0])


def _log_second_moment(a, head_dim, sum_sq):
    """log E[(f(w, q) f(w, k))^2] for |q + k|^2 = sum_sq, |q|^2 + |k|^2 left out (it does not depend on A)."""
    return head_dim * math.log(1 - 4 * a) - head_dim / 2 * math.log(1 - 8 * a) + 2 * (1 - 4 * a) / (1 - 8 * a) * sum_sq


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("rho", [0.0, 0.1, 2 / 8, 1.5])
def test_optimal_a_minimises_the_second_moment(head_dim, rho):
    best = favorpp_optimal_a(rho)
    assert best <= 0.0 and (best == 0.0) == (rho == 0.0)
    grid = torch.linspace(-1.0, 0.12, 20001, dtype=torch.float64).tolist()
    on_grid = min(grid, key=lambda a: _log_second_moment(a, head_dim, rho * head_dim))
    assert abs(on_grid - best) < 1e-4


def test_default_a_is_the_optimum_for_unit_variance_queries_and_keys():
    q, k = torch.randn(4000, 64), torch.randn(4000, 64)
    assert favorpp_rho(q, k) == pytest.approx(2 / 8, rel=0.02)
    assert favorpp_default_a(64) == pytest.approx(favorpp_optimal_a(favorpp_rho(q, k)), abs=2e-3)
    assert favorpp_default_a(64) == pytest.approx(-0.0976, abs=1e-4)
    with pytest.raises(ValueError, match="rho"):
        favorpp_optimal_a(-0.5)


# (query scale, key scale, correlation) of q, k with unit-variance entries before the D^-1/4 scaling.
PAIRS = [(0.5, 0.5, 0.0), (1.0, 1.0, 0.0), (1.0, 1.0, 0.5), (1.5, 1.0, 0.3)]


def _pair(head_dim, query_scale, key_scale, correlation, seed):
    generator = torch.Generator().manual_seed(seed)
    base, other = torch.randn(2, head_dim, generator=generator, dtype=torch.float64)
    key = correlation * base + math.sqrt(1 - correlation**2) * other
    return query_scale * base * head_dim**-0.25, key_scale * key * head_dim**-0.25


@pytest.mark.parametrize(("query_scale", "key_scale", "correlation"), PAIRS)
def test_estimator_is_unbiased_and_beats_favor_plus_variance(query_scale, key_scale, correlation):
    head_dim, draws = 16, 200_000
    q, k = _pair(head_dim, query_scale, key_scale, correlation, seed=1)
    exact = math.exp(float(q @ k))
    w = torch.randn(draws, head_dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    variances = {}
    a_optimal = favorpp_optimal_a(float((q + k).square().sum()) / head_dim)
    for name, a in [("favor+", 0.0), ("favor++ default", favorpp_default_a(head_dim)), ("favor++ optimal", a_optimal)]:
        # One sample of the estimator per row of w (M = 1 feature each).
        samples = (_textbook(q[None], w, a) * _textbook(k[None], w, a)).squeeze(0) * draws
        mean, standard_error = samples.mean().item(), samples.std().item() / math.sqrt(draws)
        assert abs(mean - exact) < 4 * standard_error, (name, mean, exact, standard_error)
        variances[name] = samples.var().item()
    ratio = variances["favor++ optimal"] / variances["favor+"]
    print(
        f"\n|q|={q.norm():.2f} |k|={k.norm():.2f} q.k={q @ k:.2f}: Var FAVOR++/FAVOR+ = {ratio:.3f} "
        f"(default A: {variances['favor++ default'] / variances['favor+']:.3f})"
    )
    assert ratio < 0.9
    assert variances["favor++ optimal"] <= variances["favor++ default"] * 1.05


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "buffer"])
def test_features_equal_the_textbook_map_up_to_per_query_and_global_constants(as_tensor):
    projection = gaussian_orthogonal_projection(40, 8, seed=1)
    a = favorpp_default_a(8)
    q, k = torch.randn(5, 8), torch.randn(6, 8)
    exact = _textbook(q * 8**-0.25, projection, a) @ _textbook(k * 8**-0.25, projection, a).T
    given = torch.tensor(a) if as_tensor else a
    phi_q, phi_k = favor_features(q, projection, True, a=given), favor_features(k, projection, False, a=given)
    ours = phi_q.double() @ phi_k.double().T
    # Each query row is scaled by one positive constant: row-normalised kernels agree.
    torch.testing.assert_close(ours / ours.sum(1, keepdim=True), exact / exact.sum(1, keepdim=True), rtol=1e-4, atol=0)


def test_features_differ_from_favor_plus_and_equal_it_at_a_zero():
    projection = gaussian_orthogonal_projection(40, 8, seed=1)
    x = torch.randn(7, 8)
    for is_query in (True, False):
        plus = favor_features(x, projection, is_query)
        assert torch.allclose(favor_features(x, projection, is_query, a=0.0), plus, rtol=1e-6, atol=0)
        assert not torch.allclose(favor_features(x, projection, is_query, a=favorpp_default_a(8)), plus, rtol=1e-2)


def test_key_features_are_positive_bounded_and_depend_on_their_key_only():
    head_dim, a = 16, favorpp_default_a(16)
    projection = gaussian_orthogonal_projection(64, head_dim, seed=2)
    keys = torch.randn(10, head_dim)
    huge = keys.clone()
    huge[3] *= 1e4  # one extreme key
    phi, phi_huge = favor_features(keys, projection, False, a=a), favor_features(huge, projection, False, a=a)
    assert (phi > 0).all() and torch.isfinite(phi_huge).all()
    kept_scale = min(head_dim / 2 * math.log(1 - 4 * a), SCALE_HEADROOM)
    assert phi_huge.max() <= math.exp(KEY_FEATURE_HEADROOM + kept_scale) / 8 * (1 + 1e-5)
    others = torch.arange(10) != 3
    assert torch.equal(phi[others], phi_huge[others])


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_no_overflow_and_favor_plus_scale_up_to_head_dim_128(head_dim):
    """Unit-variance q, k (and 3x larger): finite outputs and gradients, and FAVOR++'s one-key
    normalisers (a causal first token) on FAVOR+'s scale, far from the floor at which a query counts
    as seeing no key."""
    generator = torch.Generator().manual_seed(3)
    nb_features = default_nb_features(head_dim)
    projection = gaussian_orthogonal_projection(nb_features, head_dim, seed=4)
    q, k = torch.randn(2, 64, 1, head_dim, generator=generator), torch.randn(2, 64, 1, head_dim, generator=generator)
    log_scales = {}
    for name, a in [("favor+", None), ("favor++", favorpp_default_a(head_dim))]:
        kernel = (favor_features(q, projection, True, a=a) * favor_features(k, projection, False, a=a)).sum(-1)
        log_scales[name] = kernel.log10().median().item()
        for scale in (1.0, 3.0):
            big_q, big_k = (scale * q).requires_grad_(), (scale * k).requires_grad_()
            v = torch.randn(2, 64, 1, head_dim, generator=generator)
            out = favor_attention(big_q, big_k, v, projection, causal=True, feature_a=a)
            grads = torch.autograd.grad(out.square().sum(), (big_q, big_k))
            assert torch.isfinite(out).all() and all(torch.isfinite(grad).all() for grad in grads)
    assert abs(log_scales["favor++"] - log_scales["favor+"]) < 1.5, log_scales


# ----------------------------------------------------------------------------- the buffer


def _favorpp_attention(head_dim=16, heads=2):
    attention = Attention(head_dim * heads, heads, "favor", nb_features=24, feature_map="favor++")
    attention.draw_projection_(base_seed=5, step=0)
    return attention


def test_a_is_a_float32_buffer_with_the_default_and_survives_casts_and_redraws():
    attention = _favorpp_attention()
    assert attention.feature_a.item() == pytest.approx(favorpp_default_a(16))
    assert "feature_map_a" in attention.state_dict()
    attention.calibrate_feature_map_(a=-0.05)
    attention.to(torch.bfloat16)
    assert attention.feature_a.dtype == torch.float32 and attention.feature_a.item() == pytest.approx(-0.05)
    attention.draw_projection_(base_seed=5, step=1)
    assert attention.feature_a.item() == pytest.approx(-0.05)
    plus = Attention(32, 2, "favor", nb_features=24)
    assert plus.feature_a is None and "feature_map_a" not in plus.state_dict()


def test_calibration_sets_the_optimum_and_changes_only_later_forwards():
    attention = _favorpp_attention().eval()
    x = torch.randn(2, 9, 32)
    before = attention(x, causal=True)
    assert torch.equal(attention(x, causal=True), before)  # forward never touches A
    attention.calibrate_feature_map_(rho=0.8)
    assert attention.feature_a.item() == pytest.approx(favorpp_optimal_a(0.8))
    assert not torch.allclose(attention(x, causal=True), before)
    with pytest.raises(ValueError, match="exactly one"):
        attention.calibrate_feature_map_()
    with pytest.raises(ValueError, match="below 1/8"):
        attention.calibrate_feature_map_(a=0.2)
    with pytest.raises(ValueError, match="only FAVOR\\+\\+"):
        Attention(32, 2, "favor").calibrate_feature_map_(a=-0.1)
    attention.projection_fixed.fill_(True)
    with pytest.raises(ValueError, match="fixed"):
        attention.calibrate_feature_map_(a=-0.1)


def test_decoder_checkpoint_recompute_matches_plain_backward():
    common = dict(
        d_model=32,
        num_layers=2,
        num_heads=2,
        dropout=0.0,
        use_cross_attention=False,
        nb_features=24,
        feature_map="favor++",
        projection_seed=3,
        auto_check_redraw=False,
    )
    x = torch.randn(2, 11, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same weights both times
        decoder = PerformerDecoder(gradient_checkpointing=checkpointing, **common)
        decoder(x).square().sum().backward()
        grads.append([p.grad for p in decoder.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


# ----------------------------------------------------------------------------- config and exports


def _config(**overrides):
    return preset("tiny", vocab_size=61, d_model=32, num_heads=4, dropout=0.0, **overrides)


def test_config_field_is_validated_and_reaches_every_favor_attention():
    with pytest.raises(ValueError, match="feature_map"):
        ModelConfig(feature_map="favor+++")
    assert ModelConfig().feature_map == "favor+"
    model = build_model("seq2seq", _config(feature_map="favor++"))
    attentions = model.favor_attentions()
    assert attentions and all(attention.feature_map == "favor++" for attention in attentions)
    assert any(attention.is_cross for attention in attentions)
    assert all(attention.feature_a is None for attention in build_model("seq2seq", _config()).favor_attentions())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_export_round_trip_keeps_the_feature_map_and_a(tmp_path, dtype):
    model = build_model("seq2seq", _config(feature_map="favor++")).eval()
    model.encoder.layers[0].self_attention.calibrate_feature_map_(a=-0.2)  # one layer off the default
    out = performer.save_pretrained(model, tmp_path / "export", model_kind="seq2seq", dtype=dtype)
    loaded = performer.from_pretrained(out, dtype=torch.float32)
    assert loaded.config.feature_map == "favor++"
    for ours, theirs in zip(model.favor_attentions(), loaded.favor_attentions()):
        assert theirs.feature_a.dtype == torch.float32 and torch.equal(theirs.feature_a, ours.feature_a)
    assert loaded.encoder.layers[0].self_attention.feature_a.item() == pytest.approx(-0.2)
    if dtype == torch.float32:
        ids = torch.randint(5, 61, (2, 9))
        with torch.no_grad():
            logits = [m(input_ids=ids, decoder_input_ids=ids[:, :5]).logits for m in (model, loaded)]
        assert torch.equal(*logits)


def test_weights_move_between_feature_maps_and_each_keeps_its_own_a():
    plus = build_model("lm", _config())
    plusplus = build_model("lm", _config(feature_map="favor++"))
    load_weights(plusplus, plus.state_dict())
    default = pytest.approx(favorpp_default_a(8))
    assert all(attention.feature_a.item() == default for attention in plusplus.favor_attentions())
    load_weights(plus, plusplus.state_dict())
