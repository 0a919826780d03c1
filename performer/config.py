"""``ModelConfig``: the typed description of a pretraining model, and the named presets.

Plain data: no YAML, no DeepSpeed. ``ModelConfig.from_dict`` rejects unknown keys, so a typo in a
config file fails loudly instead of silently training the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from performer import strict
from performer.activations import ActivationFunctions
from performer.attention.kinds import KERNELS, guide_attention_type
from performer.errors import ConfigError
from performer.feature_maps import FEATURE_MAPS

NORMS = ("layernorm", "rezero", "scalenorm")
POSITIONS = ("rotary", "absolute")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    "Token vocabulary size, special tokens and span-corruption sentinels included."
    d_model: int = 512
    "Model width."
    num_heads: int = 8
    "Attention heads; d_model must be divisible by it."
    num_encoder_layers: int = 6
    "Encoder depth (seq2seq and encoder-only models)."
    num_decoder_layers: int = 6
    "Decoder depth (seq2seq and decoder-only models)."
    d_ff: float = 4
    "Feed-forward hidden size as a multiple of d_model (GLU variants use 2/3 of it)."
    dropout: float = 0.0
    "Dropout on residual branches and feed-forward hidden layers (0 is usual for pretraining)."
    attention_type: str = "favor"
    "favor: FAVOR+ (bidirectional in the encoder, causal in the decoder); softmax: exact attention."
    nb_features: int | None = None
    "FAVOR+ random features per head; None = round(D ln D) with D the head dim."
    feature_map: str = "favor+"
    (
        "Features of favor attention: favor+ or favor++ (optimised positive features, lower variance, one buffer A "
        "per attention; see performer.feature_maps)."
    )
    activation: str = "swiglu"
    "Feed-forward activation: swiglu, geglu, reglu, gelu or relu."
    norm: str = "layernorm"
    "Normalisation: layernorm (pre-norm), rezero or scalenorm (pre-ScaleNorm)."
    position: str = "rotary"
    "Positions: rotary (relative, extrapolates past the training length) or absolute (learned table)."
    max_positions: int = 2048
    "Length of the learned position table (position=absolute only)."
    tie_embeddings: bool = True
    "Output head shares the token embedding matrix."
    pad_id: int = 0
    "Padding token id (its embedding row gets no gradient)."
    decoder_start_id: int | None = None
    (
        "Token every decoder target starts from, the default of seq2seq generate(); None = pad_id (T5's choice). The "
        "trainer sets the tokenizer's bos, which its batches start with."
    )
    feature_redraw_interval: int | None = 1000
    "Redraw FAVOR+ projections every N training forwards (standalone use); None = never."
    auto_check_redraw: bool = True
    "Let the model redraw on its own; a trainer turns this off and redraws at optimizer steps."
    gradient_checkpointing: int = 0
    "Recompute layer activations in backward (non-reentrant checkpoint): 0 off, 1 every layer, k every k-th."
    chunk_size: int | None = None
    "Chunk length of causal FAVOR+; None picks one per sequence length (speed only, results do not depend on it)."
    projection_seed: int | None = None
    "Base seed of the FAVOR+ projections; None = drawn from torch's global generator."
    num_classes: int | None = None
    "Encoder-only models: size of a classification head on the first token (None = MLM head only)."

    def __post_init__(self) -> None:
        for key, choices in (
            ("attention_type", KERNELS),
            ("feature_map", FEATURE_MAPS),
            ("norm", NORMS),
            ("position", POSITIONS),
        ):
            if getattr(self, key) not in choices:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}; choose one of {', '.join(choices)}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.num_heads={self.num_heads}")
        try:
            ActivationFunctions.parse(self.activation)
        except ValueError as error:
            raise ConfigError(f"model.activation: {error}") from None
        if self.gradient_checkpointing < 0:
            raise ConfigError("model.gradient_checkpointing must be 0 (off), 1 (every layer) or k >= 2 (every k-th)")
        for name in ("pad_id", "decoder_start_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{name}={value} is outside the vocabulary (0..{self.vocab_size - 1})")

    @property
    def decoder_start(self) -> int:
        """The token seq2seq decoding starts from."""
        return self.pad_id if self.decoder_start_id is None else self.decoder_start_id

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """From a plain mapping (JSON, YAML): unknown keys and wrong types are ConfigErrors."""
        return strict.build(cls, values, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stack_params(self, role: str) -> dict[str, Any]:
        """Keyword arguments of PerformerEncoder (role="encoder") or PerformerDecoder ("decoder"/"lm")."""
        params: dict[str, Any] = dict(
            d_model=self.d_model,
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            dropout=self.dropout,
            activation=self.activation,
            nb_features=self.nb_features,
            feature_map=self.feature_map,
            use_rezero=self.norm == "rezero",
            use_scalenorm=self.norm == "scalenorm",
            feature_redraw_interval=self.feature_redraw_interval,
            auto_check_redraw=self.auto_check_redraw,
            use_rotary=self.position == "rotary",
            gradient_checkpointing=self.gradient_checkpointing,
            chunk_size=self.chunk_size,
        )
        if role == "encoder":
            params.update(
                num_layers=self.num_encoder_layers,
                attention_type=guide_attention_type(self.attention_type, causal=False),
            )
        else:
            params.update(
                num_layers=self.num_decoder_layers,
                attention_type=guide_attention_type(self.attention_type, causal=True),
                use_cross_attention=role == "decoder",
            )
        return params


# The guide's recommended sizes, plus a CPU-sized one for tests and the laptop job.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=4),
    "small": dict(d_model=256, num_heads=4, num_encoder_layers=4, num_decoder_layers=4, d_ff=4),
    "medium": dict(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, d_ff=4),
    "large": dict(d_model=1024, num_heads=16, num_encoder_layers=12, num_decoder_layers=12, d_ff=4),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with some fields overridden: ``preset("tiny", vocab_size=8000)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
