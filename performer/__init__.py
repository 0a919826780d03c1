"""Encoder-decoder Performer transformers: the user's guide API, FAVOR+ attention, pretraining models.

The model library knows nothing of DeepSpeed, YAML or ranks.
"""

from performer.activations import ActivationFunctions
from performer.pretrained import from_pretrained, save_pretrained
from performer.transformer import (
    DecodingCache,
    EncoderDecoderTransformer,
    PerformerDecoder,
    PerformerEncoder,
    PerformerLayer,
)

__all__ = [
    "ActivationFunctions",
    "DecodingCache",
    "EncoderDecoderTransformer",
    "PerformerDecoder",
    "PerformerEncoder",
    "PerformerLayer",
    "from_pretrained",
    "save_pretrained",
]
