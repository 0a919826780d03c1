"""Pretraining models: token embeddings + positions + the guide's stacks + a tied output head.

Axis legend: B batch, L / Ls / Lt sequence (source / target), E model width, V vocabulary.

* ``PerformerSeq2Seq``: encoder-decoder (T5-style span corruption, translation, summarisation).
* ``PerformerLM``: decoder-only causal language model.
* ``PerformerEncoderModel``: encoder-only, masked-LM head and optional classification head.

Batches are dicts of tensors: ``model(**batch)`` returns a ``ModelOutput`` with the logits and,
when labels are given, the mean cross-entropy over labels != -100 (computed in float32).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from performer.attention.module import PROJECTION_BUFFER_NAMES
from performer.config import ModelConfig
from performer.generation import SamplingParams, beam_search, sample_next_token
from performer.redraw import ProjectionOwner, projection_forward
from performer.transformer import (
    DecodingCache,
    PerformerDecoder,
    PerformerEncoder,
    source_key_padding,
)

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class TokenEmbedding(nn.Module):
    """ids (B, L) -> (B, L, E); learned absolute positions added when the config asks for them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        nn.init.normal_(self.tokens.weight, std=config.d_model**-0.5)
        with torch.no_grad():
            self.tokens.weight[config.pad_id].zero_()
        self.positions = None
        if config.position == "absolute":
            self.positions = nn.Embedding(config.max_positions, config.d_model)
            nn.init.normal_(self.positions.weight, std=config.d_model**-0.5)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.tokens(ids)
        if self.positions is not None:
            end = offset + ids.shape[1]
            if end > self.positions.num_embeddings:
                raise ValueError(
                    f"position {end - 1} is past the learned position table ({self.positions.num_embeddings}); "
                    "raise model.max_positions or use model.position=rotary"
                )
            x = x + self.positions(torch.arange(offset, end, device=ids.device))
        return x


class _PretrainingModel(ProjectionOwner):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = TokenEmbedding(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def _finish_init(self) -> None:
        self._setup_redraw(None, False)
        self.init_projections_(self.config.projection_seed)

    def vocabulary_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, E) -> (B, L, V)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return hidden @ self.embedding.tokens.weight.T

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None:
            return None
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )


class PerformerSeq2Seq(_PretrainingModel):
    """Encoder-decoder model with one shared token embedding (T5 style)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.encoder = PerformerEncoder(**config.stack_params("encoder"))
        self.decoder = PerformerDecoder(**config.stack_params("decoder"))
        self._finish_init()

    @projection_forward
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embedding(input_ids), mask=attention_mask)

    @projection_forward
    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, Ls), decoder_input_ids (B, Lt), masks (B, L) True = real token,
        labels (B, Lt) with -100 where no loss is wanted."""
        encoded = self.encode(input_ids, attention_mask)
        hidden = self.decoder(
            self.embedding(decoder_input_ids),
            encoder_output=encoded,
            self_attn_mask=decoder_attention_mask,
            cross_attn_mask=source_key_padding(attention_mask),
        )
        logits = self.vocabulary_logits(hidden)
        return ModelOutput(logits=logits, loss=self.loss(logits, labels))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        decoder_start_id: int | None = None,
        eos_id: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Source (B, Ls) -> generated target ids (B, <= max_new_tokens), without the start token.

        Greedy by default; ``sampling`` for temperature / top-k / top-p sampling; ``num_beams`` > 1
        for beam search. The encoder runs once and each cross-attention summarises it once; the
        decoder runs one token at a time on its cache (O(1) per token with causal FAVOR+).
        Finished rows are padded with ``config.pad_id``. ``decoder_start_id`` defaults to the
        config's (``config.decoder_start``: the token training targets started from).
        """
        if decoder_start_id is None:
            decoder_start_id = self.config.decoder_start
        with evaluating(self):
            encoded = self.encode(input_ids, attention_mask)
            cross_mask = source_key_padding(attention_mask)

            def step(tokens: torch.Tensor, cache: DecodingCache, memory, memory_mask) -> torch.Tensor:
                hidden = self.decoder(
                    self.embedding(tokens, offset=cache.length),
                    encoder_output=memory,
                    cross_attn_mask=memory_mask,
                    cache=cache,
                )
                return self.vocabulary_logits(hidden[:, -1]).float()

            batch = input_ids.shape[0]
            start = torch.full((batch, 1), decoder_start_id, dtype=torch.long, device=input_ids.device)
            if num_beams > 1:
                # K beams per source row: expand the encoder output once, not per step.
                rows = torch.arange(batch, device=input_ids.device).repeat_interleave(num_beams)
                memory = encoded.index_select(0, rows)
                memory_mask = None if cross_mask is None else cross_mask.index_select(0, rows)
                return beam_search(
                    lambda tokens, cache: step(tokens, cache, memory, memory_mask),
                    self.decoder.new_cache(),
                    start,
                    num_beams,
                    max_new_tokens,
                    eos_id,
                    self.config.pad_id,
                    length_penalty,
                )
            cache = self.decoder.new_cache()
            return _decode_loop(
                lambda tokens: step(tokens, cache, encoded, cross_mask),
                start,
                max_new_tokens,
                eos_id,
                self.config.pad_id,
                sampling,
                generator,
            )[:, 1:]


class PerformerLM(_PretrainingModel):
    """Decoder-only causal language model."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.decoder = PerformerDecoder(**config.stack_params("lm"))
        self._finish_init()

    @projection_forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, L); attention_mask (B, L) True = real token; labels (B, L), already
        shifted (labels[t] is the token after input_ids[t]), -100 where no loss is wanted."""
        hidden = self.decoder(self.embedding(input_ids), self_attn_mask=attention_mask)
        logits = self.vocabulary_logits(hidden)
        return ModelOutput(logits=logits, loss=self.loss(logits, labels))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        eos_id: int | None = None,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt (B, L), unpadded -> prompt + continuation (B, L + <= max_new_tokens).

        The prompt is consumed in one cached pass, then one token per step (O(1) per token with
        causal FAVOR+, a growing KV cache with softmax).
        """
        with evaluating(self):
            cache = self.decoder.new_cache()

            def step(tokens: torch.Tensor) -> torch.Tensor:
                hidden = self.decoder(self.embedding(tokens, offset=cache.length), cache=cache)
                return self.vocabulary_logits(hidden[:, -1]).float()

            return _decode_loop(step, input_ids, max_new_tokens, eos_id, self.config.pad_id, sampling, generator)


class PerformerEncoderModel(_PretrainingModel):
    """Encoder-only model: masked-LM logits, and class logits when ``config.num_classes`` is set."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.encoder = PerformerEncoder(**config.stack_params("encoder"))
        self.classifier = nn.Linear(config.d_model, config.num_classes) if config.num_classes else None
        self._finish_init()

    @projection_forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, L) -> MLM logits (B, L, V) (labels: (B, L), -100 = not masked); with a
        classifier and class_labels (B,), logits are (B, C) from the first token instead."""
        hidden = self.encoder(self.embedding(input_ids), mask=attention_mask)
        if self.classifier is not None and labels is None:
            logits = self.classifier(hidden[:, 0])
            loss = None if class_labels is None else F.cross_entropy(logits.float(), class_labels)
            return ModelOutput(logits=logits, loss=loss)
        logits = self.vocabulary_logits(hidden)
        return ModelOutput(logits=logits, loss=self.loss(logits, labels))


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no automatic redraw) for the block, then the caller's mode again."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _decode_loop(step, tokens, max_new_tokens, eos_id, pad_id, sampling, generator) -> torch.Tensor:
    """Feed ``tokens`` (B, L), then append one token per step until EOS everywhere or the limit."""
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    logits = step(tokens)  # (B, V)
    for _ in range(max_new_tokens):
        next_token = sample_next_token(logits, sampling, generator)
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if eos_id is not None:
            finished |= next_token == eos_id
            if bool(finished.all()):
                break
        logits = step(next_token[:, None])
    return tokens


MODEL_CLASSES = {"seq2seq": PerformerSeq2Seq, "lm": PerformerLM, "encoder": PerformerEncoderModel}


def training_flops(model: _PretrainingModel, encoder_tokens: int, decoder_tokens: int) -> float:
    """Counted FLOPs of one training step (forward + backward) over these tokens: 6 x the parameters
    each token passes through, attention's own products excluded (the usual MFU convention).

    Encoder tokens pass the encoder and the cross-attention key and value projections (they read
    the encoder's output); decoder tokens the rest of the decoder and the vocabulary projection (an
    LM's tokens are decoder tokens; an encoder model's pass the encoder and the projection).
    Counting every parameter for every token instead overstates a seq2seq step about twice.
    """

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    head = model.config.d_model * model.config.vocab_size
    decoder, encoder = getattr(model, "decoder", None), getattr(model, "encoder", None)
    flops = 0
    if decoder is not None:
        memory_projections = sum(
            count(module.k_proj) + count(module.v_proj)
            for name, module in decoder.named_modules()
            if name.rpartition(".")[2] == "cross_attention"
        )
        flops += (count(decoder) - memory_projections + head) * decoder_tokens + memory_projections * encoder_tokens
    if encoder is not None:
        flops += (count(encoder) + (head if decoder is None else 0)) * encoder_tokens
    return 6.0 * flops


def build_model(kind: str, config: ModelConfig) -> _PretrainingModel:
    """``kind``: seq2seq, lm or encoder."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[kind](config)


def is_projection_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in PROJECTION_BUFFER_NAMES


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load ``state_dict`` strictly, except for FAVOR+ projection buffers.

    This is how the same weights move between the softmax and the FAVOR+ variant of a model (the
    Performer paper's fine-tuning of pretrained transformers): every parameter must match; the
    target keeps its own projections unless the source has some for it too.
    """
    own = model.state_dict()
    wanted = {name for name in own if not is_projection_key(name)}
    given = {name for name in state_dict if not is_projection_key(name)}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing or unexpected:
        raise ValueError(f"weights do not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    usable = {name: tensor for name, tensor in state_dict.items() if name in own}
    model.load_state_dict({**own, **usable}, strict=True)
