"""Rotary position embedding (Su et al., 2021), applied to queries and keys of self-attention.

Axis legend: B batch, H heads, L sequence, D head dim (even).

Why rotary: it encodes relative position inside q.k, so it composes with FAVOR+ (the feature map
sees already-rotated q and k: exp(q^T R_{t-s} k) is still a softmax kernel), adds no parameters,
and extrapolates past the training length, unlike a learned absolute table. Pairs are split as
halves of the head dimension (GPT-NeoX layout).
"""

from __future__ import annotations

import torch


def rotary_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (L,) int -> cos, sin each (L, D) float32."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    inverse_frequencies = base ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.float()[:, None] * inverse_frequencies[None, :]  # (L, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, D) by position; computed in float32, returned in x's dtype."""
    first, second = x.float().chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated_half * sin).to(x.dtype)
