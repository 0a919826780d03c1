"""Multi-head attention with a softmax or a FAVOR+ / FAVOR++ kernel, for self- or cross-attention.

Axis legend: B batch, H heads, Lq queries, Lk keys, D head dim, E model width, M random features.

Parameter names do not depend on the kernel, so the same weights load into the softmax and the
FAVOR variants (only FAVOR has the ``projection*`` buffers, and only FAVOR++ its parameter A,
``feature_map_a``: see ``performer.feature_maps``). Like the projection, A is a float32 buffer
that only changes between forwards (``calibrate_feature_map_``), never from the batch in hand.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from einops import rearrange

from performer.attention.favor import (
    CausalLinearState,
    attend_to_summary,
    causal_linear_attention_step,
    mask_keys,
    summarise_keys,
)
from performer.attention.fused import favor_attention
from performer.attention.masks import KeyMasks, reduce_to_key_masks
from performer.attention.softmax import softmax_attention
from performer.feature_maps import (
    FEATURE_MAPS,
    check_favorpp_a,
    default_nb_features,
    derive_seed,
    favor_features,
    favorpp_default_a,
    favorpp_optimal_a,
    gaussian_orthogonal_projection,
)
from performer.rotary import apply_rotary

Kernel = Literal["softmax", "favor"]

# Buffers that only FAVOR attention has; everything else is shared with the softmax twin.
# feature_map_a (FAVOR++ only) travels with the projection: exported in float32, required by
# exports, kept by the target when weights move between kernels.
PROJECTION_BUFFER_NAMES = ("projection", "projection_draw", "projection_fixed", "feature_map_a")
# Float buffers that dtype casts (model.half(), DeepSpeed bf16) must leave in float32.
FLOAT32_BUFFER_NAMES = ("projection", "feature_map_a")


class Attention(nn.Module):
    """softmax or FAVOR attention; ``context_dim`` set = cross-attention over another sequence.

    feature_map (FAVOR only): "favor+" or "favor++" (see ``performer.feature_maps``).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        kernel: Kernel,
        nb_features: int | None = None,
        context_dim: int | None = None,
        chunk_size: int | None = None,
        feature_map: str = "favor+",
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if kernel not in ("softmax", "favor"):
            raise ValueError(f"unknown attention kernel {kernel!r}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r}; choose one of {', '.join(FEATURE_MAPS)}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.kernel = kernel
        self.feature_map = feature_map
        self.chunk_size = chunk_size
        self.is_cross = context_dim is not None
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(context_dim or d_model, d_model, bias=False)
        self.v_proj = nn.Linear(context_dim or d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        if kernel == "favor":
            self.nb_features = nb_features or default_nb_features(self.head_dim)
            # Set for real by the owning stack (see performer.redraw); zeros until then.
            self.projection_id = 0
            self.register_buffer("projection", torch.zeros(self.nb_features, self.head_dim))
            # (base seed, projection id, redraw step) the projection was drawn from.
            self.register_buffer("projection_draw", torch.zeros(3, dtype=torch.long))
            self.register_buffer("projection_fixed", torch.zeros((), dtype=torch.bool))
            self.recent_draws: dict[tuple[int, int], torch.Tensor] = {}  # (base seed, step) -> draw, CPU
            if feature_map == "favor++":
                # FAVOR++'s A: the optimum for unit-variance q and k until calibrated.
                self.register_buffer("feature_map_a", torch.tensor(favorpp_default_a(self.head_dim)))

    # ------------------------------------------------------------------ projections

    @property
    def uses_favor(self) -> bool:
        return self.kernel == "favor"

    @property
    def feature_a(self) -> torch.Tensor | None:
        """FAVOR++'s parameter A (a 0-dim float32 buffer); None for FAVOR+ and softmax."""
        return self._buffers.get("feature_map_a")

    def _draw(self, base_seed: int, step: int) -> torch.Tensor:
        """(M, D) float32 on the CPU: the draw for (base seed, this module's id, step)."""
        key = (int(base_seed), int(step))
        cache = self.recent_draws
        if key not in cache:
            # A blend needs the same two draws for a whole interval: keep the last few.
            while len(cache) >= 3:
                cache.pop(next(iter(cache)))
            cache[key] = gaussian_orthogonal_projection(
                self.nb_features, self.head_dim, derive_seed(base_seed, self.projection_id, step)
            )
        return cache[key]

    def draw_projection_(self, base_seed: int, step: int) -> None:
        """Draw the projection for (base seed, this module's id, step); pure function of those."""
        self.blend_projection_(base_seed, step, step, 0.0)

    def blend_projection_(self, base_seed: int, first: int, second: int, weight: float) -> None:
        """cos(a) draw(first) + sin(a) draw(second), a = weight x pi / 2 (weight in [0, 1]).

        Two independent draws, each row N(0, I_D), mixed with cos^2 + sin^2 = 1: every row of the
        blend is exactly N(0, I_D) again, so FAVOR+ stays unbiased all the way from one draw to
        the next (rows of a block are orthogonal at the two ends, nearly so in between).
        ``projection_draw`` records ``first``.
        """
        projection = self._draw(base_seed, first)
        if weight:
            angle = 0.5 * math.pi * weight
            projection = math.cos(angle) * projection + math.sin(angle) * self._draw(base_seed, second)
        with torch.no_grad():
            self.projection.copy_(projection.to(self.projection.device))
            self.projection_draw.copy_(torch.tensor([base_seed, self.projection_id, first]))

    @torch.no_grad()
    def calibrate_feature_map_(self, rho: float | None = None, a: float | None = None) -> None:
        """Set FAVOR++'s A: the variance optimum for ``rho`` (mean |q + k|^2 / D after the D^-1/4
        scaling, see ``feature_maps.favorpp_rho``), or ``a`` itself.

        For a trainer, at a step boundary, with the same value on every rank (like a redraw: never
        inside a forward). Refused for FAVOR+ and for fixed (exported) features.
        """
        if self.feature_a is None:
            raise ValueError(f"only FAVOR++ attention has a parameter A (this one: {self.kernel}, {self.feature_map})")
        if bool(self.projection_fixed):
            raise ValueError("the features of this attention are fixed (fix_projection_matrices_): A stays as it is")
        if (rho is None) == (a is None):
            raise ValueError("pass exactly one of rho and a")
        self.feature_a.fill_(check_favorpp_a(favorpp_optimal_a(rho) if a is None else a))

    def _apply(self, fn, recurse=True):
        # Mixed-precision casts (model.half(), DeepSpeed bf16) must not round the projection or A:
        # the features are computed in float32 from them. Device moves still apply.
        kept = {name: self._buffers.get(name) for name in FLOAT32_BUFFER_NAMES}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            moved = self._buffers.get(name)
            if before is not None and moved is not None and moved.dtype != torch.float32:
                self._buffers[name] = before.to(device=moved.device, dtype=torch.float32)
        return self

    # ------------------------------------------------------------------ forward

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b l (h d) -> b h l d", h=self.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x (B, Lq, E); context (B, Lk, E_ctx) for cross-attention -> (B, Lq, E).

        mask: bool (B, Lk) or (B, Lq, Lk), True = attend (see performer.attention.masks).
        rotary: (cos, sin) each (Lq, D), applied to q and k of self-attention.
        cache: a dict owned by the caller for incremental decoding; this module keeps its keys
        (softmax), its running FAVOR+ state, or its once-per-sequence cross-attention summary.
        """
        q = self._split_heads(self.q_proj(x))  # (B, H, Lq, D)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs the encoder output as context")
            out = self._cross(q, context, mask, cache)
        else:
            out = self._self(q, x, mask, causal, rotary, cache)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))

    def _keys_values(self, source: torch.Tensor, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._split_heads(self.k_proj(source))  # (B, H, Lk, D)
        v = self._split_heads(self.v_proj(source))
        if rotary is not None:
            k = apply_rotary(k, *rotary)
        return k, v

    def _self(self, q, x, mask, causal, rotary, cache) -> torch.Tensor:
        k, v = self._keys_values(x, rotary)
        if cache is None:
            return self._attend(q, k, v, mask, causal)
        if mask is not None:
            raise ValueError("incremental decoding takes no self-attention mask: feed unpadded prompts")
        if not causal:
            raise ValueError("incremental decoding needs causal self-attention")
        if self.kernel == "softmax":
            if "key" in cache:
                k = torch.cat([cache["key"], k], dim=2)
                v = torch.cat([cache["value"], v], dim=2)
            cache["key"], cache["value"] = k, v
            return softmax_attention(q, k, v, causal=True)
        with _fp32_region(q):
            phi_q, phi_k = self._features(q, k)
            state = (
                CausalLinearState(cache["key_value"], cache["key_sum"])
                if "key_value" in cache
                else (CausalLinearState.empty(q.shape[0], self.num_heads, self.nb_features, self.head_dim, q.device))
            )
            out, state = causal_linear_attention_step(phi_q, phi_k, v, state)
        cache["key_value"], cache["key_sum"] = state.key_value, state.key_sum
        return out

    def _cross(self, q, context, mask, cache) -> torch.Tensor:
        if cache is None:
            k, v = self._keys_values(context)
            return self._attend(q, k, v, mask, causal=False)
        if self.kernel == "softmax":
            if "key" not in cache:
                cache["key"], cache["value"] = self._keys_values(context)
                # Batch-first like every cached tensor, so beam search can reorder it.
                cache["mask"] = None if mask is None else mask.expand(q.shape[0], *mask.shape[1:])
            return softmax_attention(q, cache["key"], cache["value"], cache["mask"])
        with _fp32_region(q):
            if "key_value" not in cache:
                # Summarise the encoder output once: S = sum phi(k) v^T, z = sum phi(k).
                k, v = self._keys_values(context)
                key_masks = self._key_masks(mask, causal=False)
                phi_k = self._features_of(k, is_query=False)
                cache["key_value"], cache["key_sum"] = summarise_keys(*mask_keys(phi_k, v, key_masks.key_padding))
            phi_q = self._features_of(q, is_query=True)
            return attend_to_summary(phi_q, cache["key_value"], cache["key_sum"], q.dtype)

    def _attend(self, q, k, v, mask, causal) -> torch.Tensor:
        if self.kernel == "softmax":
            return softmax_attention(q, k, v, mask, causal)
        key_masks = self._key_masks(mask, causal)
        with _fp32_region(q):
            out = favor_attention(
                q, k, v, self.projection, key_masks.key_padding, causal, self.chunk_size, self.feature_a
            )
        if key_masks.query_valid is not None:
            out = torch.where(key_masks.query_valid[:, None, :, None], out, torch.zeros((), dtype=out.dtype))
        return out

    @staticmethod
    def _key_masks(mask: torch.Tensor | None, causal: bool) -> KeyMasks:
        if mask is None:
            return KeyMasks(None, None)
        return reduce_to_key_masks(mask, causal)

    def _features_of(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        return favor_features(x, self.projection, is_query=is_query, a=self.feature_a)

    def _features(self, q, k) -> tuple[torch.Tensor, torch.Tensor]:
        return self._features_of(q, is_query=True), self._features_of(k, is_query=False)


def _fp32_region(like: torch.Tensor) -> torch.autocast:
    """Autocast off: FAVOR+ features and sums stay float32 under bf16/fp16 autocast."""
    return torch.autocast(device_type=like.device.type, enabled=False)
