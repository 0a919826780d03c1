"""Attention masks: the guide's forms, normalised once.

Axis legend: B batch, Lq queries, Lk keys.

Accepted forms (1 / True = attend, 0 / False = masked):
* key padding ``(B, Lk)``: which keys exist. Works for every attention type in O(L).
* full ``(B, Lq, Lk)`` (or ``(B, 1, Lq, Lk)``): works as given for softmax attention. Linear
  (FAVOR+) attention can only remove keys, so a full mask is accepted there only when it is a
  key-padding mask in disguise: every query row is either the same key-padding row or all zero
  (a padded query), and for causal attention the rows may also be that row cut at the diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyMasks:
    """What linear attention can apply.

    key_padding: (B, Lk) bool, True = key exists; None = every key exists.
    query_valid: (B, Lq) bool, False = the query attends to nothing (its output is zero);
                 None = every query attends.
    """

    key_padding: torch.Tensor | None
    query_valid: torch.Tensor | None


def as_bool(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Mask of any dtype (bool, 0/1 ints or floats) -> bool, True = attend."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask != 0


def squeeze_head_axis(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, Lq, Lk) -> (B, Lq, Lk); other shapes unchanged."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(
                f"per-head masks are not supported: got shape {tuple(mask.shape)}; "
                "pass one mask for all heads, shaped (B, Lk) or (B, Lq, Lk)"
            )
        return mask[:, 0]
    return mask


def check_mask_shape(mask: torch.Tensor, batch: int, query_length: int, key_length: int, name: str) -> None:
    if mask.dim() == 2 and mask.shape in ((batch, key_length), (1, key_length)):
        return
    if mask.dim() == 3 and mask.shape[1:] == (query_length, key_length) and mask.shape[0] in (1, batch):
        return
    raise ValueError(
        f"{name} has shape {tuple(mask.shape)}, expected a key-padding mask ({batch}, {key_length}) "
        f"or a full mask ({batch}, {query_length}, {key_length}) (1 = attend, 0 = masked)"
    )


def reduce_to_key_masks(mask: torch.Tensor, causal: bool, name: str = "mask") -> KeyMasks:
    """Express a normalised bool mask as key padding (+ empty query rows) or raise ValueError."""
    if mask.dim() == 2:
        return KeyMasks(key_padding=mask, query_valid=None)
    query_length, key_length = mask.shape[-2:]
    query_valid = mask.any(dim=-1)  # (B, Lq)
    key_padding = mask.any(dim=-2)  # (B, Lk): the union of the rows
    expected = query_valid[:, :, None] & key_padding[:, None, :]
    if torch.equal(mask, expected):
        return KeyMasks(key_padding, None if bool(query_valid.all()) else query_valid)
    if causal and query_length == key_length:
        diagonal = torch.ones(query_length, key_length, dtype=torch.bool, device=mask.device).tril()
        if torch.equal(mask, expected & diagonal):
            return KeyMasks(key_padding, None if bool(query_valid.all()) else query_valid)
    raise ValueError(
        f"{name} of shape {tuple(mask.shape)} differs between query rows, and linear (FAVOR+) "
        "attention can only remove keys in O(n): it has no per-pair weights to mask. Pass a "
        "key-padding mask (B, Lk) (plus causal attention for a triangular pattern), or use "
        'attention_type="softmax" for arbitrary masks.'
    )
