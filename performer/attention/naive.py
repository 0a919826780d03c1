"""References for FAVOR+ linear attention on precomputed features: plain, readable, slow.

Axis legend: B batch, H heads, L / Lq / Lk sequence, M random features, D value head dim,
N chunks, C chunk length.

Used by the tests (the fused op ``performer.attention.fused`` and the decoding step are compared
with them, values and gradients) and the benchmarks; no production path calls them.

* ``linear_attention``: bidirectional, through the key summary;
* ``causal_linear_attention``: chunk-parallel causal attention (the algorithm of the fused op,
  in autograd-visible torch ops);
* ``linear_attention_quadratic``, ``causal_linear_attention_quadratic``: the explicit (Lq, Lk)
  kernel matrix, masked lower-triangular for the causal one;
* ``causal_linear_attention_recurrent``: one token at a time through the decoding step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from performer.attention.favor import (
    DEFAULT_CHUNK_SIZE,
    CausalLinearState,
    attend_to_summary,
    causal_linear_attention_step,
    normalise,
    summarise_keys,
)


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

    out = normalise(numerator, denominator, v.dtype)  # (B, H, N, C, D)
    return out.reshape(batch, heads, padded_length, value_dim)[:, :, :length]


def linear_attention_quadratic(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Twin of ``linear_attention`` through the explicit (Lq, Lk) kernel matrix."""
    scores = phi_q @ phi_k.transpose(-2, -1)  # (B, H, Lq, Lk)
    return normalise(scores @ v.float(), scores.sum(dim=-1), v.dtype)


def causal_linear_attention_quadratic(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Twin of ``causal_linear_attention``: the explicit lower-triangular kernel matrix."""
    scores = (phi_q @ phi_k.transpose(-2, -1)).tril()  # (B, H, L, L)
    return normalise(scores @ v.float(), scores.sum(dim=-1), v.dtype)


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
