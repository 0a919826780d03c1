"""Invariants of the guide's modules: causality, padding invariance, mixed-precision stability (FAVOR+ and FAVOR++)."""

import pytest
import torch

from performer import EncoderDecoderTransformer, PerformerDecoder, PerformerEncoder

D_MODEL = 32


def _decoder(attention_type, **kwargs):
    return PerformerDecoder(
        d_model=D_MODEL,
        num_layers=2,
        num_heads=4,
        dropout=0.0,
        attention_type=attention_type,
        use_cross_attention=False,
        nb_features=32,
        chunk_size=4,
        **kwargs,
    ).eval()


CAUSAL_SETUPS = [
    pytest.param(dict(attention_type="causal_linear"), id="causal_linear"),
    pytest.param(dict(attention_type="softmax"), id="softmax+use_causal_mask"),
    pytest.param(dict(attention_type="causal_linear", use_rotary=True), id="causal_linear+rotary"),
    pytest.param(dict(attention_type="causal_linear", feature_map="favor++"), id="causal_linear+favor++"),
]
# (attention_type, feature_map) of bidirectional stacks.
ENCODER_SETUPS = [
    pytest.param("linear", "favor+", id="linear"),
    pytest.param("linear", "favor++", id="linear+favor++"),
    pytest.param("softmax", "favor+", id="softmax"),
]
FAVOR_FEATURE_MAPS = ["favor+", "favor++"]


@pytest.mark.parametrize("setup", CAUSAL_SETUPS)
@pytest.mark.parametrize("change", ["replace", "scale_by_100"])
def test_future_tokens_never_change_the_past(setup, change):
    decoder = _decoder(**setup)
    x = torch.randn(2, 19, D_MODEL)
    t = 9
    future = x.clone()
    if change == "replace":
        future[:, t + 1 :] = torch.randn_like(future[:, t + 1 :])
    else:
        future[:, t + 1 :] *= 100.0  # the stabiliser trap: large future keys
    before = decoder(x, use_causal_mask=True)
    after = decoder(future, use_causal_mask=True)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


def _padded(x, lengths, total, garbage_scale=50.0):
    padded = torch.randn(x.shape[0], total, x.shape[2]) * garbage_scale
    mask = torch.zeros(x.shape[0], total, dtype=torch.bool)
    for row, length in enumerate(lengths):
        padded[row, :length] = x[row, :length]
        mask[row, :length] = True
    return padded, mask


@pytest.mark.parametrize(("attention_type", "feature_map"), ENCODER_SETUPS)
def test_encoder_padding_invariance(attention_type, feature_map):
    encoder = PerformerEncoder(
        d_model=D_MODEL,
        num_layers=2,
        num_heads=4,
        dropout=0.0,
        attention_type=attention_type,
        nb_features=32,
        feature_map=feature_map,
    ).eval()
    x = torch.randn(2, 10, D_MODEL)
    padded, mask = _padded(x, [10, 6], 16)
    out = encoder(padded, mask=mask)
    regarbaged, _ = _padded(x, [10, 6], 16, garbage_scale=-3.0)
    assert torch.equal(out[mask], encoder(regarbaged, mask=mask)[mask])
    # Equal to the same sequences without any padding.
    assert torch.allclose(out[0, :10], encoder(x[:1]).squeeze(0), atol=1e-5)
    assert torch.allclose(out[1, :6], encoder(x[1:, :6]).squeeze(0), atol=1e-5)


@pytest.mark.parametrize(("encoder_type", "feature_map"), ENCODER_SETUPS)
def test_seq2seq_padding_invariance_through_cross_attention(encoder_type, feature_map):
    decoder_type = "causal_linear" if encoder_type == "linear" else "softmax"
    common = dict(d_model=D_MODEL, num_layers=1, num_heads=4, dropout=0.0, feature_map=feature_map)
    model = EncoderDecoderTransformer(
        encoder_params=dict(common, attention_type=encoder_type),
        decoder_params=dict(common, attention_type=decoder_type),
    ).eval()
    src = torch.randn(1, 7, D_MODEL)
    tgt = torch.randn(1, 5, D_MODEL)
    padded_src, src_mask = _padded(src, [7], 12)
    padded_tgt, tgt_mask = _padded(tgt, [5], 9)
    out = model(padded_src, padded_tgt, src_mask=src_mask, tgt_mask=tgt_mask)
    assert torch.allclose(out[:, :5], model(src, tgt), atol=1e-5)
    # The guide's (B, Lt, Ls) cross mask means the same thing.
    cross = src_mask[:, None, :].expand(1, 9, 12)
    assert torch.allclose(
        out, model(padded_src, padded_tgt, src_mask=src_mask, tgt_mask=tgt_mask, cross_attn_mask=cross)
    )


@pytest.mark.parametrize("feature_map", FAVOR_FEATURE_MAPS)
def test_bf16_training_at_16k_tokens_with_large_inputs_stays_finite(feature_map):
    decoder = PerformerDecoder(
        d_model=64,
        num_layers=1,
        num_heads=1,
        dropout=0.0,
        use_cross_attention=False,
        nb_features=64,
        feature_map=feature_map,
    ).to(torch.bfloat16)
    x = (torch.randn(1, 16384, 64) * 10).to(torch.bfloat16).requires_grad_()
    out = decoder(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert torch.isfinite(x.grad.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in decoder.parameters() if p.grad is not None)
    # The projection (and FAVOR++'s A) is never rounded to bf16.
    attention = decoder.layers[0].self_attention
    assert attention.projection.dtype == torch.float32
    assert feature_map == "favor+" or attention.feature_a.dtype == torch.float32


@pytest.mark.parametrize("feature_map", FAVOR_FEATURE_MAPS)
def test_autocast_keeps_favor_sums_in_float32(feature_map):
    encoder = PerformerEncoder(d_model=D_MODEL, num_layers=1, num_heads=4, dropout=0.0, feature_map=feature_map).eval()
    x = torch.randn(2, 64, D_MODEL) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = encoder(x)
    assert torch.isfinite(low.float()).all()
    assert torch.allclose(low.float(), encoder(x), atol=0.15)


@pytest.mark.parametrize("feature_map", FAVOR_FEATURE_MAPS)
def test_bf16_causal_favor_attention_without_normalisation_stays_finite(feature_map):
    from performer.attention.module import Attention

    attention = Attention(64, 1, "favor", nb_features=128, feature_map=feature_map)
    attention.draw_projection_(base_seed=1, step=0)
    attention = attention.to(torch.bfloat16)
    x = (torch.randn(1, 16384, 64) * 10).to(torch.bfloat16).requires_grad_()
    out = attention(x, causal=True)
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(x.grad.float()).all()
