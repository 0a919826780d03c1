"""Residual branches with the guide's three normalisation strategies.

* LayerNorm (default): pre-norm, x + dropout(f(LayerNorm(x))), and a final LayerNorm per stack.
* ReZero (Bachlechner et al., 2020): x + alpha * dropout(f(x)) with a learned scalar alpha that
  starts at 0, so every layer starts as the identity; no normalisation at all.
* PreScaleNorm (Nguyen & Salazar, 2019): pre-norm with ScaleNorm, g * x / |x|, one learned gain
  g per normaliser initialised to sqrt(d_model).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class ScaleNorm(nn.Module):
    """(..., E) -> (..., E): L2-normalise the last axis, times one learned gain."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(d_model) ** 0.5))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return x * (self.gain / norm)


def check_norm_choice(use_rezero: bool, use_scalenorm: bool) -> None:
    if use_rezero and use_scalenorm:
        raise ValueError("use_rezero and use_scalenorm are exclusive: pick one (or neither for LayerNorm)")


def make_norm(d_model: int, use_rezero: bool, use_scalenorm: bool) -> nn.Module:
    """The normaliser a branch input or a stack output goes through (Identity under ReZero)."""
    check_norm_choice(use_rezero, use_scalenorm)
    if use_rezero:
        return nn.Identity()
    if use_scalenorm:
        return ScaleNorm(d_model)
    return nn.LayerNorm(d_model)


class ResidualBranch(nn.Module):
    """x -> x + scale * dropout(f(norm(x))), with the normalisation strategy chosen once."""

    def __init__(self, d_model: int, dropout: float, use_rezero: bool, use_scalenorm: bool):
        super().__init__()
        self.norm = make_norm(d_model, use_rezero, use_scalenorm)
        self.rezero_alpha = nn.Parameter(torch.zeros(())) if use_rezero else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        update = self.dropout(branch(self.norm(x)))
        if self.rezero_alpha is not None:
            update = self.rezero_alpha * update
        return x + update
