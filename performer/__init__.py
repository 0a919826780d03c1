"""Encoder-decoder Performer transformers: the user's guide API, FAVOR+ attention, pretraining models.

The model library knows nothing of DeepSpeed, YAML or ranks, and never imports Hugging Face
transformers: importing performer only arranges that performer.hf registers its classes with
transformers' Auto classes once the program imports transformers (performer/autoregister.py).
"""

from performer import autoregister
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

autoregister.install()
