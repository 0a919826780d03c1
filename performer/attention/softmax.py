"""Exact softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

Axis legend: B batch, H heads, Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """(B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D) -> (B, H, Lq, D).

    mask: bool, True = attend; (B, Lk) key padding or (B, Lq, Lk). ``causal`` aligns the last
    query with the last key (so a single decoding query sees every cached key).
    A query row with no key to attend gets zeros, not the NaN of a softmax over nothing.
    """
    query_length, key_length = q.shape[-2], k.shape[-2]
    if mask is None and (not causal or query_length == key_length):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and query_length > 1)
    allowed = torch.ones(1, query_length, key_length, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=key_length - query_length)
    if mask is not None:
        allowed = allowed & (mask[:, None, :] if mask.dim() == 2 else mask)
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, Lq, 1)
    # Rows with no key attend everywhere (finite), then are zeroed.
    allowed = allowed | ~has_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    return torch.where(has_key[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
