"""The guide's masks, reduced to what linear attention can apply, or refused clearly."""

import pytest
import torch

from performer import PerformerEncoder, PerformerLayer
from performer.attention.masks import reduce_to_key_masks


def _padding(lengths, total):
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def test_guide_style_padding_mask_reduces_to_key_padding():
    mask = torch.ones(2, 5, 5, dtype=torch.bool)
    mask[:, :, [3, 4]] = False  # the guide's mask[:, :, pad_positions] = 0
    reduced = reduce_to_key_masks(mask, causal=False)
    assert torch.equal(reduced.key_padding, _padding([3, 3], 5))
    assert reduced.query_valid is None


def test_outer_product_mask_keeps_padded_queries_empty():
    keys = _padding([4, 2], 6)
    mask = keys[:, :, None] & keys[:, None, :]
    reduced = reduce_to_key_masks(mask, causal=False)
    assert torch.equal(reduced.key_padding, keys)
    assert torch.equal(reduced.query_valid, keys)


def test_causal_mask_in_disguise_is_accepted_for_causal_attention_only():
    keys = _padding([6, 4], 6)
    mask = torch.ones(6, 6, dtype=torch.bool).tril() & keys[:, None, :]
    assert torch.equal(reduce_to_key_masks(mask, causal=True).key_padding, keys)
    with pytest.raises(ValueError, match="key-padding mask"):
        reduce_to_key_masks(mask, causal=False)


def test_arbitrary_mask_with_linear_attention_is_a_clear_error():
    layer = PerformerLayer(d_model=16, num_heads=2, attention_type="linear")
    mask = torch.ones(1, 4, 4)
    mask[0, 1, 2] = 0
    with pytest.raises(ValueError, match='attention_type="softmax"'):
        layer(torch.randn(1, 4, 16), mask=mask)


def test_arbitrary_mask_works_with_softmax_attention():
    layer = PerformerLayer(d_model=16, num_heads=2, attention_type="softmax", dropout=0.0)
    mask = torch.rand(1, 4, 4) > 0.5
    assert torch.isfinite(layer(torch.randn(1, 4, 16), mask=mask)).all()


def test_wrong_mask_shape_names_the_mask_and_the_expected_shapes():
    encoder = PerformerEncoder(d_model=16, num_heads=2, num_layers=1)
    with pytest.raises(ValueError, match=r"self_attn_mask has shape \(2, 7\).*\(2, 5\)"):
        encoder(torch.randn(2, 5, 16), mask=torch.ones(2, 7))


def test_float_and_int_masks_mean_one_is_attend():
    encoder = PerformerEncoder(d_model=16, num_heads=2, num_layers=1, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    lengths = _padding([5, 3], 5)
    as_bool = encoder(x, mask=lengths)
    assert torch.equal(as_bool, encoder(x, mask=lengths.float()))
    assert torch.equal(as_bool, encoder(x, mask=lengths.long()))
