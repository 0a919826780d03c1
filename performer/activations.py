"""Feed-forward blocks and the guide's ``ActivationFunctions``.

Axis legend: B batch, L sequence, E model width (d_model), F hidden width.

``d_ff`` is a multiplier of d_model (the guide's convention: ``d_ff=4`` -> F = 4 E). The gated
variants (SwiGLU, GeGLU, ReGLU; Shazeer 2020) have three weight matrices instead of two, so their
hidden width is 2/3 of that, rounded up to a multiple of 8: the parameter count then matches the
plain GELU/ReLU block of the same ``d_ff``.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn as nn
import torch.nn.functional as F


class ActivationFunctions(str, Enum):
    SWIGLU = "swiglu"
    GEGLU = "geglu"
    REGLU = "reglu"
    GELU = "gelu"
    RELU = "relu"

    @classmethod
    def parse(cls, value: "ActivationFunctions | str") -> "ActivationFunctions":
        """Accept the enum or its name in any case ("SWIGLU", "swiglu")."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(member.name for member in cls)
            raise ValueError(f"unknown activation {value!r}; choose one of {names}") from None

    @property
    def is_gated(self) -> bool:
        return self in (ActivationFunctions.SWIGLU, ActivationFunctions.GEGLU, ActivationFunctions.REGLU)


_NONLINEARITY = {
    ActivationFunctions.SWIGLU: F.silu,
    ActivationFunctions.GEGLU: F.gelu,
    ActivationFunctions.REGLU: F.relu,
    ActivationFunctions.GELU: F.gelu,
    ActivationFunctions.RELU: F.relu,
}

# d_ff above this is almost surely a hidden size (e.g. 2048) passed where a multiplier is expected.
MAX_FF_MULTIPLIER = 64


def hidden_width(d_model: int, d_ff: float, activation: ActivationFunctions) -> int:
    if not 0 < d_ff <= MAX_FF_MULTIPLIER:
        raise ValueError(
            f"d_ff={d_ff} is a multiplier of d_model (hidden = d_ff * d_model), expected in "
            f"(0, {MAX_FF_MULTIPLIER}]; for a hidden size of {d_ff} pass d_ff={d_ff}/{d_model}"
        )
    width = d_ff * d_model
    if activation.is_gated:
        return 8 * math.ceil(2 * width / 3 / 8)
    return int(round(width))


class FeedForward(nn.Module):
    """(B, L, E) -> (B, L, E): in-projection, activation (gated or not), dropout, out-projection."""

    def __init__(self, d_model: int, d_ff: float, activation: ActivationFunctions | str, dropout: float):
        super().__init__()
        self.activation = ActivationFunctions.parse(activation)
        self.hidden = hidden_width(d_model, d_ff, self.activation)
        # Gated variants: one fused matrix produces the gate and the value halves.
        self.w_in = nn.Linear(d_model, self.hidden * (2 if self.activation.is_gated else 1))
        self.w_out = nn.Linear(self.hidden, d_model)
        self.dropout = nn.Dropout(dropout)
        self.nonlinearity = _NONLINEARITY[self.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.w_in(x)  # (B, L, F) or (B, L, 2F)
        if self.activation.is_gated:
            gate, value = hidden.chunk(2, dim=-1)
            hidden = self.nonlinearity(gate) * value
        else:
            hidden = self.nonlinearity(hidden)
        return self.w_out(self.dropout(hidden))
