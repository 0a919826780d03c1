"""The guide's API: PerformerLayer, PerformerEncoder, PerformerDecoder, EncoderDecoderTransformer.

Axis legend: B batch, L / Ls / Lt sequence (source / target), E model width (d_model).

Every constructor keyword of the guide is accepted, with a default, so its partial forms work.
``attention_type`` names the self-attention: "softmax" (exact, O(L^2)), "linear" (bidirectional
FAVOR+) or "causal_linear" (causal FAVOR+). Cross-attention uses FAVOR+ unless the self-attention
is softmax (override with ``cross_attention_type``). Masks: 1/True = attend, 0/False = masked,
shaped (B, Lk) (key padding, every attention type) or (B, Lq, Lk) (see performer.attention.masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from performer.activations import ActivationFunctions, FeedForward
from performer.attention.kinds import GUIDE_CROSS_ATTENTION_TYPES, kernel_of
from performer.attention.masks import as_bool, check_mask_shape, squeeze_head_axis
from performer.attention.module import Attention
from performer.normalization import ResidualBranch, make_norm
from performer.redraw import ProjectionOwner, inside_forward, projection_forward
from performer.rotary import rotary_angles


def prepare_mask(mask, batch: int, query_length: int, key_length: int, name: str) -> torch.Tensor | None:
    """Any accepted mask -> bool (B, Lk) or (B, Lq, Lk), True = attend; shape errors name the mask."""
    if mask is None:
        return None
    mask = squeeze_head_axis(as_bool(torch.as_tensor(mask)))
    check_mask_shape(mask, batch, query_length, key_length, name)
    return mask


def _one_of(mask, self_attn_mask):
    if mask is not None and self_attn_mask is not None:
        raise ValueError("pass either mask or self_attn_mask (they are the same thing), not both")
    return self_attn_mask if self_attn_mask is not None else mask


@dataclass
class DecodingCache:
    """Incremental-decoding state of one decoder stack.

    layers: per layer {"self": {...}, "cross": {...}}, filled by the attention modules (softmax
    keys/values, FAVOR+ running state, cross-attention summaries). length: tokens consumed.
    """

    layers: list[dict[str, dict[str, Any]]]
    length: int = 0

    def reorder_(self, batch_indices: torch.Tensor) -> None:
        """Select / repeat batch rows of every cached tensor (beam search); all have batch first."""
        for layer in self.layers:
            for entries in layer.values():
                for key, value in entries.items():
                    if isinstance(value, torch.Tensor):
                        entries[key] = value.index_select(0, batch_indices.to(value.device))


class PerformerLayer(ProjectionOwner):
    """One pre-norm block: self-attention, optional cross-attention, feed-forward."""

    def __init__(
        self,
        d_model: int = 512,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        num_heads: int = 8,
        d_ff: float = 4,
        dropout: float = 0.1,
        attention_type: str = "linear",
        activation: ActivationFunctions | str = ActivationFunctions.GELU,
        use_cross_attention: bool = False,
        nb_features: int | None = None,
        use_rezero: bool = False,
        use_scalenorm: bool = False,
        feature_redraw_interval: int | None = 1000,
        auto_check_redraw: bool = True,
        cross_attention_type: str | None = None,
        context_dim: int | None = None,
        chunk_size: int | None = None,
        projection_seed: int | None = None,
        feature_map: str = "favor+",
    ):
        """
        d_model: model width E. device: where the parameters live. batch_size: accepted for the
        guide's compatibility, not needed (shapes come from the inputs). num_heads: E must divide.
        d_ff: feed-forward hidden size as a multiple of d_model (GLU variants use 2/3 of it).
        dropout: on residual branches and the feed-forward hidden layer. attention_type: see the
        module docstring. activation: an ActivationFunctions member or its name.
        use_cross_attention: add encoder-decoder attention (decoder mode). nb_features: FAVOR+
        random features M (default round(D ln D), D the head dim). use_rezero / use_scalenorm:
        normalisation strategy (LayerNorm if neither). feature_redraw_interval / auto_check_redraw:
        redraw projections every N training forwards of the outermost module.
        cross_attention_type: "softmax" or "linear" (default follows attention_type).
        context_dim: width of the encoder output (default d_model). chunk_size: causal FAVOR+
        chunk length (None: chosen per sequence length). projection_seed: base seed of the projections
        (default: from torch's RNG).
        feature_map: "favor+" or "favor++" (lower-variance optimised positive features, see
        performer.feature_maps), for the FAVOR self- and cross-attention.
        """
        super().__init__()
        self_kernel = kernel_of(attention_type)
        if cross_attention_type is None:
            cross_attention_type = "softmax" if attention_type == "softmax" else "linear"
        cross_kernel = kernel_of(cross_attention_type, "cross_attention_type", GUIDE_CROSS_ATTENTION_TYPES)
        self.d_model = d_model
        self.batch_size = batch_size
        self.attention_type = attention_type
        self.always_causal = attention_type == "causal_linear"
        self.self_attention = Attention(
            d_model, num_heads, self_kernel, nb_features, chunk_size=chunk_size, feature_map=feature_map
        )
        self.self_attention_branch = ResidualBranch(d_model, dropout, use_rezero, use_scalenorm)
        self.cross_attention = None
        if use_cross_attention:
            self.cross_attention = Attention(
                d_model,
                num_heads,
                cross_kernel,
                nb_features,
                context_dim=context_dim or d_model,
                feature_map=feature_map,
            )
            self.cross_attention_branch = ResidualBranch(d_model, dropout, use_rezero, use_scalenorm)
        self.feed_forward = FeedForward(d_model, d_ff, activation, dropout)
        self.feed_forward_branch = ResidualBranch(d_model, dropout, use_rezero, use_scalenorm)
        self._setup_redraw(feature_redraw_interval, auto_check_redraw)
        self.init_projections_(projection_seed)
        if device is not None:
            self.to(device)

    @projection_forward
    def forward(
        self,
        x: torch.Tensor,
        encoder_output: torch.Tensor | None = None,
        self_attn_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        use_causal_mask: bool = False,
        mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x (B, L, E) -> (B, L, E). ``mask`` is an alias of ``self_attn_mask``.

        Self-attention is causal when attention_type is "causal_linear" or use_causal_mask is set.
        """
        batch, length, _ = x.shape
        self_mask = prepare_mask(_one_of(mask, self_attn_mask), batch, length, length, "self_attn_mask")
        causal = self.always_causal or use_causal_mask
        self_cache = cache["self"] if cache is not None else None
        x = self.self_attention_branch(
            x, lambda h: self.self_attention(h, mask=self_mask, causal=causal, rotary=rotary, cache=self_cache)
        )
        if self.cross_attention is not None:
            if encoder_output is None:
                raise ValueError(
                    "this layer has cross-attention: pass encoder_output=..., or build it with "
                    "use_cross_attention=False for a decoder-only model"
                )
            cross_mask = prepare_mask(cross_attn_mask, batch, length, encoder_output.shape[1], "cross_attn_mask")
            cross_cache = cache["cross"] if cache is not None else None
            x = self.cross_attention_branch(
                x, lambda h: self.cross_attention(h, context=encoder_output, mask=cross_mask, cache=cross_cache)
            )
        elif encoder_output is not None:
            raise ValueError("encoder_output given to a layer built with use_cross_attention=False")
        return self.feed_forward_branch(x, self.feed_forward)


class _PerformerStack(ProjectionOwner):
    """Layers + final norm; shared by the encoder and the decoder."""

    def __init__(
        self,
        *,
        d_model: int,
        device,
        batch_size,
        num_layers: int,
        use_rezero: bool,
        use_scalenorm: bool,
        feature_redraw_interval: int | None,
        auto_check_redraw: bool,
        use_rotary: bool,
        gradient_checkpointing: int | bool,
        projection_seed: int | None,
        **layer_kwargs,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.d_model = d_model
        self.batch_size = batch_size
        self.use_rotary = use_rotary
        self.gradient_checkpointing = gradient_checkpointing
        self.layers = nn.ModuleList(
            PerformerLayer(
                d_model=d_model,
                use_rezero=use_rezero,
                use_scalenorm=use_scalenorm,
                # The stack owns the redraw policy; its layers never redraw on their own.
                feature_redraw_interval=None,
                auto_check_redraw=False,
                projection_seed=0,
                **layer_kwargs,
            )
            for _ in range(num_layers)
        )
        self.final_norm = make_norm(d_model, use_rezero, use_scalenorm)
        self._setup_redraw(feature_redraw_interval, auto_check_redraw)
        self.init_projections_(projection_seed)
        if device is not None:
            self.to(device)

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attention.head_dim

    def _rotary(self, length: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.use_rotary:
            return None
        return rotary_angles(torch.arange(offset, offset + length, device=device), self.head_dim)

    def _run_layers(self, x: torch.Tensor, cache: DecodingCache | None = None, **layer_inputs) -> torch.Tensor:
        rotary = self._rotary(x.shape[1], cache.length if cache is not None else 0, x.device)
        # gradient_checkpointing: 0/False = off, 1/True = every layer, k = every k-th layer.
        every = int(self.gradient_checkpointing)
        checkpointing = every > 0 and self.training and torch.is_grad_enabled() and cache is None
        for index, layer in enumerate(self.layers):
            layer_cache = cache.layers[index] if cache is not None else None
            if checkpointing and index % every == 0:
                # Recompute runs inside_forward() too, so it can never tick a redraw.
                x = checkpoint(_layer_in_forward, layer, x, rotary, layer_inputs, use_reentrant=False)
            else:
                x = layer(x, rotary=rotary, cache=layer_cache, **layer_inputs)
        if cache is not None:
            cache.length += x.shape[1]
        return self.final_norm(x)


def _layer_in_forward(layer: PerformerLayer, x, rotary, layer_inputs: dict) -> torch.Tensor:
    with inside_forward():
        return layer(x, rotary=rotary, **layer_inputs)


class PerformerEncoder(_PerformerStack):
    """Bidirectional stack: (B, L, E) -> (B, L, E)."""

    def __init__(
        self,
        d_model: int = 512,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        num_layers: int = 6,
        num_heads: int = 8,
        d_ff: float = 4,
        dropout: float = 0.1,
        attention_type: str = "linear",
        activation: ActivationFunctions | str = ActivationFunctions.GELU,
        nb_features: int | None = None,
        use_rezero: bool = False,
        use_scalenorm: bool = False,
        feature_redraw_interval: int | None = 1000,
        auto_check_redraw: bool = True,
        use_rotary: bool = False,
        gradient_checkpointing: int | bool = False,
        chunk_size: int | None = None,
        projection_seed: int | None = None,
        feature_map: str = "favor+",
    ):
        """Keywords as PerformerLayer's, plus num_layers, use_rotary (rotary positions in
        self-attention) and gradient_checkpointing (recompute layers in backward: True or 1 = every
        layer, k = every k-th layer)."""
        super().__init__(
            d_model=d_model,
            device=device,
            batch_size=batch_size,
            num_layers=num_layers,
            use_rezero=use_rezero,
            use_scalenorm=use_scalenorm,
            feature_redraw_interval=feature_redraw_interval,
            auto_check_redraw=auto_check_redraw,
            use_rotary=use_rotary,
            gradient_checkpointing=gradient_checkpointing,
            projection_seed=projection_seed,
            num_heads=num_heads,
            d_ff=d_ff,
            dropout=dropout,
            attention_type=attention_type,
            activation=activation,
            use_cross_attention=False,
            nb_features=nb_features,
            feature_map=feature_map,
            chunk_size=chunk_size,
        )

    @projection_forward
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, E); mask (B, L) key padding or (B, L, L)."""
        return self._run_layers(x, self_attn_mask=mask)


class PerformerDecoder(_PerformerStack):
    """Causal stack with cross-attention by default: (B, Lt, E) [+ (B, Ls, E_enc)] -> (B, Lt, E)."""

    def __init__(
        self,
        d_model: int = 512,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        num_layers: int = 6,
        num_heads: int = 8,
        d_ff: float = 4,
        dropout: float = 0.1,
        attention_type: str = "causal_linear",
        activation: ActivationFunctions | str = ActivationFunctions.GELU,
        use_cross_attention: bool = True,
        nb_features: int | None = None,
        use_rezero: bool = False,
        use_scalenorm: bool = False,
        feature_redraw_interval: int | None = 1000,
        auto_check_redraw: bool = True,
        cross_attention_type: str | None = None,
        context_dim: int | None = None,
        use_rotary: bool = False,
        gradient_checkpointing: int | bool = False,
        chunk_size: int | None = None,
        projection_seed: int | None = None,
        feature_map: str = "favor+",
    ):
        """Keywords as PerformerEncoder's, plus use_cross_attention (default True),
        cross_attention_type and context_dim (the encoder's width, default d_model)."""
        super().__init__(
            d_model=d_model,
            device=device,
            batch_size=batch_size,
            num_layers=num_layers,
            use_rezero=use_rezero,
            use_scalenorm=use_scalenorm,
            feature_redraw_interval=feature_redraw_interval,
            auto_check_redraw=auto_check_redraw,
            use_rotary=use_rotary,
            gradient_checkpointing=gradient_checkpointing,
            projection_seed=projection_seed,
            num_heads=num_heads,
            d_ff=d_ff,
            dropout=dropout,
            attention_type=attention_type,
            activation=activation,
            use_cross_attention=use_cross_attention,
            nb_features=nb_features,
            feature_map=feature_map,
            cross_attention_type=cross_attention_type,
            context_dim=context_dim,
            chunk_size=chunk_size,
        )
        self.use_cross_attention = use_cross_attention

    def new_cache(self) -> DecodingCache:
        """An empty state for incremental decoding (see ``forward(cache=...)``)."""
        return DecodingCache(layers=[{"self": {}, "cross": {}} for _ in self.layers])

    @projection_forward
    def forward(
        self,
        x: torch.Tensor,
        encoder_output: torch.Tensor | None = None,
        self_attn_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        use_causal_mask: bool = True,
        mask: torch.Tensor | None = None,
        cache: DecodingCache | None = None,
    ) -> torch.Tensor:
        """x (B, Lt, E); encoder_output (B, Ls, E_enc); masks (B, Lk) or (B, Lq, Lk).

        cache: from ``new_cache()``; feeds x as the next tokens after those already consumed
        (O(1) per token with causal FAVOR+), and updates the cache in place.
        """
        return self._run_layers(
            x,
            cache=cache,
            encoder_output=encoder_output,
            self_attn_mask=_one_of(mask, self_attn_mask),
            cross_attn_mask=cross_attn_mask,
            use_causal_mask=use_causal_mask,
        )


def source_key_padding(src_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The source keys that exist, as (B, Ls), from an encoder mask (B, Ls) or (B, Ls, Ls)."""
    if src_mask is None:
        return None
    mask = squeeze_head_axis(as_bool(torch.as_tensor(src_mask)))
    # A source position no query may attend to is padding for the decoder as well.
    return mask if mask.dim() == 2 else mask.any(dim=-2)


class EncoderDecoderTransformer(ProjectionOwner):
    """PerformerEncoder + PerformerDecoder: (B, Ls, E), (B, Lt, E) -> (B, Lt, E)."""

    def __init__(
        self,
        encoder_params: dict | None = None,
        decoder_params: dict | None = None,
        projection_seed: int | None = None,
    ):
        """encoder_params / decoder_params: keyword dicts for PerformerEncoder / PerformerDecoder
        (any subset; defaults as theirs). The decoder's cross-attention reads the encoder's width."""
        super().__init__()
        encoder_params = dict(encoder_params or {})
        decoder_params = dict(decoder_params or {})
        self.encoder = PerformerEncoder(**encoder_params)
        decoder_params.setdefault("context_dim", self.encoder.d_model)
        self.decoder = PerformerDecoder(**decoder_params)
        self._setup_redraw(None, False)
        self.init_projections_(projection_seed)

    @projection_forward
    def encode(self, src: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(src, mask=mask)

    @projection_forward
    def decode(
        self,
        tgt: torch.Tensor,
        encoder_output: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        use_causal_mask: bool = True,
        cache: DecodingCache | None = None,
    ) -> torch.Tensor:
        return self.decoder(
            tgt,
            encoder_output=encoder_output,
            self_attn_mask=self_attn_mask,
            cross_attn_mask=cross_attn_mask,
            use_causal_mask=use_causal_mask,
            cache=cache,
        )

    @projection_forward
    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        use_causal_mask: bool = True,
    ) -> torch.Tensor:
        """src (B, Ls, E), tgt (B, Lt, E) -> (B, Lt, E).

        Without cross_attn_mask, the decoder attends to the source positions src_mask keeps.
        """
        encoded = self.encoder(src, mask=src_mask)
        if cross_attn_mask is None:
            cross_attn_mask = source_key_padding(src_mask)
        return self.decoder(
            tgt,
            encoder_output=encoded,
            self_attn_mask=tgt_mask,
            cross_attn_mask=cross_attn_mask,
            use_causal_mask=use_causal_mask,
        )
