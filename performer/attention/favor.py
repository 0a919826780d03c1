"""FAVOR+ linear attention on precomputed features: what decoding and cross-attention summaries use.

Axis legend: B batch, H heads, L / Lq / Lk sequence, M random features, D value head dim,
N chunks, C chunk length.

All functions take phi(q), phi(k) as float32 (see ``performer.feature_maps``) and do their sums in
float32 whatever the dtype of v; the result has v's dtype. Padded keys are removed from both sums
(numerator and normaliser) by the caller zeroing their features and values (``mask_keys``). A
query with no key at all gets a zero output, never NaN: the features are positive, so the
normaliser is zero exactly when every key is masked.

Here: ``mask_keys``, ``summarise_keys`` / ``attend_to_summary`` (cross-attention reads the
encoder once) and ``causal_linear_attention_step`` (one decoding step on a running state).
Training goes through the fused op (``performer.attention.fused``); the references the tests and
benchmarks compare against are in ``performer.attention.naive``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CHUNK_SIZE = 64
# Normalisers this small only arise from underflowed features (see _normalise).
DENOMINATOR_FLOOR = 1e-30


def mask_keys(
    phi_k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the features and values of padded keys.

    phi_k: (B, H, Lk, M); v: (B, H, Lk, D); key_padding_mask: (B, Lk) bool, True = real key.
    ``where`` rather than a product, so that inf/NaN in padded positions cannot leak.
    """
    if key_padding_mask is None:
        return phi_k, v
    keep = key_padding_mask[:, None, :, None]  # (B, 1, Lk, 1)
    return torch.where(keep, phi_k, 0.0), torch.where(keep, v, torch.zeros((), dtype=v.dtype))


def normalise(numerator: torch.Tensor, denominator: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """numerator (..., D) / denominator (...), 0 where there is no key.

    Divided as (numerator / s) / (denominator / s) with s = denominator, detached: the value is
    the same, but the backward never squares a tiny denominator (1e-30 ** 2 underflows to 0 and
    turns the gradient into NaN). Below DENOMINATOR_FLOOR every visible key's features have
    underflowed (keys far larger than any query sees in a normalised model): such a query is
    treated as seeing no key rather than dividing noise by noise.
    """
    has_key = denominator > DENOMINATOR_FLOOR
    scale = torch.where(has_key, denominator, torch.ones_like(denominator)).detach()
    unit = torch.where(has_key, denominator, scale) / scale  # == 1, carries the gradient
    return (numerator / scale.unsqueeze(-1) / unit.unsqueeze(-1)).to(dtype)


def summarise_keys(phi_k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything queries need from the keys: S = sum phi(k) v^T (B, H, M, D), z = sum phi(k) (B, H, M)."""
    return phi_k.transpose(-2, -1) @ v.float(), phi_k.sum(dim=-2)


def attend_to_summary(
    phi_q: torch.Tensor, key_value: torch.Tensor, key_sum: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """phi(q) S / phi(q) z: (B, H, Lq, M), (B, H, M, D), (B, H, M) -> (B, H, Lq, D)."""
    numerator = phi_q @ key_value  # (B, H, Lq, D)
    denominator = (phi_q * key_sum.unsqueeze(-2)).sum(dim=-1)  # (B, H, Lq)
    return normalise(numerator, denominator, dtype)


@dataclass
class CausalLinearState:
    """Running FAVOR+ decoding state of one attention layer.

    key_value: (B, H, M, D) float32, sum over past keys of phi(k) v^T.
    key_sum:   (B, H, M) float32, sum over past keys of phi(k).
    """

    key_value: torch.Tensor
    key_sum: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, nb_features: int, value_dim: int, device) -> "CausalLinearState":
        return cls(
            key_value=torch.zeros(batch, heads, nb_features, value_dim, device=device),
            key_sum=torch.zeros(batch, heads, nb_features, device=device),
        )


def causal_linear_attention_step(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    state: CausalLinearState,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, CausalLinearState]:
    """Append T new tokens to the state and attend from them: O(1) in the past length.

    (B, H, T, M), (B, H, T, M), (B, H, T, D) -> (B, H, T, D), new state. T is usually 1; a
    prompt may be fed at once: it is consumed ``chunk_size`` tokens at a time (causal within each
    piece), so a long prompt costs O(T chunk_size) memory, not a T x T score matrix.
    """
    length = phi_q.shape[2]
    if length > chunk_size:
        outputs = []
        for start in range(0, length, chunk_size):
            piece = slice(start, start + chunk_size)
            out, state = causal_linear_attention_step(
                phi_q[:, :, piece], phi_k[:, :, piece], v[:, :, piece], state, chunk_size
            )
            outputs.append(out)
        return torch.cat(outputs, dim=2), state
    scores = (phi_q @ phi_k.transpose(-2, -1)).tril()  # (B, H, T, T)
    values = v.float()
    numerator = scores @ values + phi_q @ state.key_value
    denominator = scores.sum(dim=-1) + (phi_q * state.key_sum.unsqueeze(-2)).sum(dim=-1)
    new_state = CausalLinearState(
        key_value=state.key_value + phi_k.transpose(-2, -1) @ values,
        key_sum=state.key_sum + phi_k.sum(dim=-2),
    )
    return normalise(numerator, denominator, v.dtype), new_state
