"""FAVOR+ linear attention on precomputed features: fast paths and their naive twins.

Axis legend: B batch, H heads, L / Lq / Lk sequence, M random features, D value head dim,
N chunks, C chunk length.

All functions take phi(q), phi(k) as float32 (see ``performer.feature_maps``) and do their sums in
float32 whatever the dtype of v; the result has v's dtype. Padded keys are removed from both sums
(numerator and normaliser) by the caller zeroing their features and values (``mask_keys``). A
query with no key at all gets a zero output, never NaN: the features are positive, so the
normaliser is zero exactly when every key is masked.

Fast paths:   ``linear_attention`` (bidirectional), ``causal_linear_attention`` (chunk-parallel),
              ``causal_linear_attention_step`` (one decoding step on a running state).
Naive twins:  ``linear_attention_quadratic``, ``causal_linear_attention_quadratic``,
              ``causal_linear_attention_recurrent``: for tests only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def _normalise(numerator: torch.Tensor, denominator: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
    return _normalise(numerator, denominator, dtype)


def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional FAVOR+: (B, H, Lq, M), (B, H, Lk, M), (B, H, Lk, D) -> (B, H, Lq, D)."""
    return attend_to_summary(phi_q, *summarise_keys(phi_k, v), v.dtype)


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the entries strictly before each index (no cumsum(x) - x cancellation error)."""
    shifted = x.narrow(dim, 0, x.shape[dim] - 1).cumsum(dim)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), shifted], dim=dim)


def causal_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Causal FAVOR+, chunk-parallel: O(L) memory, all matmuls, no loop over chunks.

    Inside a chunk: (phi_q phi_k^T, lower-triangular) v. Across chunks: the exclusive prefix sum
    of per-chunk states S = sum phi(k) v^T and z = sum phi(k).
    (B, H, L, M), (B, H, L, M), (B, H, L, D) -> (B, H, L, D).
    """
    batch, heads, length, nb_features = phi_q.shape
    value_dim = v.shape[-1]
    chunk = max(1, min(chunk_size, length))
    padded_length = -(-length // chunk) * chunk
    pad = padded_length - length
    values = v.float()
    if pad:
        # Zero features on padded tail keys contribute nothing; tail queries are cut off below.
        phi_q = F.pad(phi_q, (0, 0, 0, pad))
        phi_k = F.pad(phi_k, (0, 0, 0, pad))
        values = F.pad(values, (0, 0, 0, pad))
    nb_chunks = padded_length // chunk
    q_chunks = phi_q.reshape(batch, heads, nb_chunks, chunk, nb_features)
    k_chunks = phi_k.reshape(batch, heads, nb_chunks, chunk, nb_features)
    v_chunks = values.reshape(batch, heads, nb_chunks, chunk, value_dim)

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).tril()
    scores = (q_chunks @ k_chunks.transpose(-2, -1)).masked_fill(~causal, 0.0)  # (B, H, N, C, C)
    numerator = scores @ v_chunks  # (B, H, N, C, D)
    denominator = scores.sum(dim=-1)  # (B, H, N, C)

    chunk_states = k_chunks.transpose(-2, -1) @ v_chunks  # (B, H, N, M, D)
    chunk_key_sums = k_chunks.sum(dim=-2)  # (B, H, N, M)
    prior_states = _exclusive_cumsum(chunk_states, dim=2)  # (B, H, N, M, D)
    prior_key_sums = _exclusive_cumsum(chunk_key_sums, dim=2)  # (B, H, N, M)
    numerator = numerator + q_chunks @ prior_states
    denominator = denominator + (q_chunks * prior_key_sums.unsqueeze(-2)).sum(dim=-1)

    out = _normalise(numerator, denominator, v.dtype)  # (B, H, N, C, D)
    return out.reshape(batch, heads, padded_length, value_dim)[:, :, :length]


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
    return _normalise(numerator, denominator, v.dtype), new_state


# ----------------------------------------------------------------------------- naive twins


def linear_attention_quadratic(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Twin of ``linear_attention`` through the explicit (Lq, Lk) kernel matrix."""
    scores = phi_q @ phi_k.transpose(-2, -1)  # (B, H, Lq, Lk)
    return _normalise(scores @ v.float(), scores.sum(dim=-1), v.dtype)


def causal_linear_attention_quadratic(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Twin of ``causal_linear_attention``: the explicit lower-triangular kernel matrix."""
    scores = (phi_q @ phi_k.transpose(-2, -1)).tril()  # (B, H, L, L)
    return _normalise(scores @ v.float(), scores.sum(dim=-1), v.dtype)


def causal_linear_attention_recurrent(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Twin of ``causal_linear_attention``: one token at a time through the decoding step."""
    batch, heads, length, nb_features = phi_q.shape
    state = CausalLinearState.empty(batch, heads, nb_features, v.shape[-1], phi_q.device)
    outputs = []
    for t in range(length):
        out, state = causal_linear_attention_step(
            phi_q[:, :, t : t + 1], phi_k[:, :, t : t + 1], v[:, :, t : t + 1], state
        )
        outputs.append(out)
    return torch.cat(outputs, dim=2)
