"""transformers models that wrap the pretraining models of performer.models: one implementation.

* ``PerformerForConditionalGeneration``: a seq2seq export (``AutoModelForSeq2SeqLM``).
* ``PerformerForCausalLM``: an LM export (``AutoModelForCausalLM``).

Each builds ``performer.models.PerformerSeq2Seq`` / ``PerformerLM`` and adopts its modules under
the same names (``embedding``, ``encoder``, ``decoder``, ``lm_head``), so the state dict is the
export's, key for key: transformers loads model.safetensors as it is, and ``save_pretrained``
writes an export ``performer.from_pretrained`` opens. Forward passes call those modules and the
pretraining models' own methods (``encode``, ``vocabulary_logits``, ``loss``); nothing of the
attention, the layers or the head is written again here.

The FAVOR+ projections are fixed as exported (never redrawn) and kept in float32 under bf16/fp16.
``generate()`` decodes on ``PerformerCache``, a transformers ``Cache`` around the recurrent
decoding state of performer.transformer (``DecodingCache``: the running ``sum phi(k) v^T`` and
``sum phi(k)`` of causal FAVOR+, O(1) per token; keys and values for softmax models; the
cross-attention summary of the encoder output, made once). Beam search reorders it in place.

LM labels follow transformers' convention (``labels`` = the input ids, shifted inside), not
``PerformerLM``'s (already shifted).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput

from performer import hf_files
from performer.hf.configuration import PerformerConfig
from performer.models import IGNORE_INDEX, PerformerLM, PerformerSeq2Seq, build_model
from performer.redraw import ProjectionOwner, projection_forward
from performer.transformer import DecodingCache, source_key_padding


class PerformerCache(Cache):
    """transformers' handle on a decoder's ``DecodingCache`` (recurrent FAVOR+ state, softmax keys
    and values, cross-attention summaries). Every cached tensor has the batch first, so beam
    search reorders rows with ``DecodingCache.reorder_``. It cannot be cropped: a running sum
    does not forget tokens (assisted decoding, which needs that, is not supported)."""

    def __init__(self, state: DecodingCache):
        super().__init__(layers=[])
        self.state = state

    def __repr__(self) -> str:
        return f"PerformerCache(layers={len(self.state.layers)}, length={self.state.length})"

    def __len__(self) -> int:
        return len(self.state.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.state.length + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.reorder_(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state.reorder_(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.batch_size
        if rows > 0:
            self.state.reorder_(torch.arange(rows).repeat_interleave(repeats))

    @property
    def batch_size(self) -> int:
        for layer in self.state.layers:
            for entries in layer.values():
                for value in entries.values():
                    if isinstance(value, torch.Tensor):
                        return value.shape[0]
        return -1

    def reset(self) -> None:
        self.state = DecodingCache(layers=[{"self": {}, "cross": {}} for _ in self.state.layers])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent FAVOR+ decoding state cannot drop tokens (no assisted decoding)")

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state.length > 0


class _Encoder(nn.Module):
    """What ``get_encoder()`` returns to transformers: token ids -> encoder output, through the
    model's own embedding and encoder (held by reference, so no weight gets a second name)."""

    main_input_name = "input_ids"

    def __init__(self, owner: "PerformerForConditionalGeneration"):
        super().__init__()
        object.__setattr__(self, "_owner", owner)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput:
        _check_no_extra_outputs(output_attentions, output_hidden_states)
        return BaseModelOutput(last_hidden_state=self._owner.encode(input_ids, attention_mask))


class PerformerPreTrainedModel(PreTrainedModel, ProjectionOwner):
    """Shared by both models: builds the pretraining model of ``config`` and adopts its modules."""

    config_class = PerformerConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerformerLayer"]
    # Trainer: the loss is a mean over the labels of the batch; no num_items_in_batch needed.
    accepts_loss_kwargs = False
    model_kind: ClassVar[str]
    pretraining_class: ClassVar[type]

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        if config.model_kind != self.model_kind:
            auto = hf_files.AUTO_MODEL_CLASSES.get(config.model_kind, "performer.from_pretrained")
            raise ValueError(
                f"{config.name_or_path or 'this config'} is a {config.model_kind} export and "
                f"{type(self).__name__} reads {self.model_kind} exports: open it with {auto}"
            )
        dtype = torch.get_default_dtype()
        with _built_for_real():
            core = build_model(self.model_kind, config.model_config())
        core.to(dtype)  # float32 projections stay float32 (Attention._apply)
        # The modules under the pretraining model's names: the state dict is the export's.
        self.embedding = core.embedding
        self.lm_head = core.lm_head
        for name in ("encoder", "decoder"):
            if hasattr(core, name):
                setattr(self, name, getattr(core, name))
        self._setup_redraw(None, False)
        self.fix_projection_matrices_()  # as exported: transformers never redraws features
        self.post_init()

    # ------------------------------------------------------------------ one implementation

    vocabulary_logits = PerformerSeq2Seq.vocabulary_logits
    loss = staticmethod(PerformerSeq2Seq.loss)

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the modules initialise themselves when built (performer.models)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own PerformerCache on the first cached forward

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """No-op: the export's remote code is written by hf_files, not copied from this module by transformers."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.tokens = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.lm_head  # None when tied: the head is the embedding matrix itself

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save, plus the export's remote-code files: the directory stays an export
        that ``performer.from_pretrained`` and transformers (with or without ``performer``
        imported) both open."""
        super().save_pretrained(save_directory, *args, **kwargs)
        from pathlib import Path

        hf_files.write_remote_code(Path(save_directory))

    def _decoding_cache(
        self, past_key_values: Any, use_cache: bool | None, labels: torch.Tensor | None
    ) -> PerformerCache | None:
        if past_key_values is not None:
            if not isinstance(past_key_values, PerformerCache):
                raise TypeError(
                    f"the cache is a {type(past_key_values).__name__}; a Performer decodes on a PerformerCache "
                    "(pass the one a previous call returned, or none: the model makes its own)"
                )
            return past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and labels is None and not self.training:
            return PerformerCache(self.decoder.new_cache())
        return None

    def _output(self, output, return_dict: bool | None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


class PerformerForConditionalGeneration(PerformerPreTrainedModel, GenerationMixin):
    """A seq2seq export (``PerformerSeq2Seq``) for transformers: forward, loss, ``generate()``.

    Batches as T5's: ``input_ids`` / ``attention_mask`` for the encoder, ``labels`` for the
    target (``decoder_input_ids`` are made from them when absent: the decoder start token, then
    the labels shifted right, -100 as padding).
    """

    model_kind = "seq2seq"
    pretraining_class = PerformerSeq2Seq
    encode = PerformerSeq2Seq.encode

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        # transformers' generate() compares it with main_input_name when the model has an encoder.
        self.encoder.main_input_name = self.main_input_name

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return _Encoder(self)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    @projection_forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: PerformerCache | None = None,
        past_key_values: PerformerCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: None = None,
        decoder_inputs_embeds: None = None,
    ) -> Seq2SeqLMOutput | tuple:
        """Shapes: ids and masks (B, L), True/1 = real token; labels (B, Lt), -100 = no loss.
        logits_to_keep: k > 0 computes the logits of the last k positions only. inputs_embeds and
        decoder_inputs_embeds are accepted as None only (PEFT passes them)."""
        _check_no_extra_outputs(output_attentions, output_hidden_states)
        _check_no_embeds(inputs_embeds, decoder_inputs_embeds)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (the decoder input is made from them)")
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if encoder_outputs is None:
            encoded = self.encode(input_ids, attention_mask)
        else:
            encoded = encoder_outputs[0]
        cache = self._decoding_cache(cache if cache is not None else past_key_values, use_cache, labels)
        if cache is not None:
            decoder_attention_mask = _unpadded(decoder_attention_mask, "decoder_attention_mask")
        hidden = self.decoder(
            self.embedding(decoder_input_ids, offset=cache.state.length if cache is not None else 0),
            encoder_output=encoded,
            self_attn_mask=decoder_attention_mask,
            cross_attn_mask=source_key_padding(attention_mask),
            cache=cache.state if cache is not None else None,
        )
        if logits_to_keep and labels is None:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.vocabulary_logits(hidden)
        output = Seq2SeqLMOutput(
            loss=self.loss(logits, labels),
            logits=logits,
            encoder_last_hidden_state=encoded,
            **{_cache_field(Seq2SeqLMOutput): cache},
        )
        return self._output(output, return_dict)


class PerformerForCausalLM(PerformerPreTrainedModel, GenerationMixin):
    """An LM export (``PerformerLM``) for transformers: forward, loss, ``generate()``.

    ``labels`` are the input ids (-100 = no loss), shifted inside as in every transformers causal
    LM. Generation from a batch takes prompts of equal length (the recurrent state has no padding
    mask): left-padded prompts are refused with a ValueError.
    """

    model_kind = "lm"
    pretraining_class = PerformerLM

    @projection_forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: PerformerCache | None = None,
        past_key_values: PerformerCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, L); attention_mask (B, L) True/1 = real token; labels (B, L), -100 = no loss.
        inputs_embeds is accepted as None only (PEFT passes it)."""
        _check_no_extra_outputs(output_attentions, output_hidden_states)
        _check_no_embeds(inputs_embeds)
        cache = self._decoding_cache(cache if cache is not None else past_key_values, use_cache, labels)
        if cache is not None:
            attention_mask = _unpadded(attention_mask, "attention_mask")
        hidden = self.decoder(
            self.embedding(input_ids, offset=cache.state.length if cache is not None else 0),
            self_attn_mask=attention_mask,
            cache=cache.state if cache is not None else None,
        )
        if logits_to_keep and labels is None:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.vocabulary_logits(hidden)
        loss = None if labels is None else self.loss(logits[:, :-1], labels[:, 1:])
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{_cache_field(CausalLMOutputWithPast): cache})
        return self._output(output, return_dict)


def _cache_field(output_class: type) -> str:
    """The outputs' name of the decoding state: "cache" since transformers renamed
    "past_key_values" (5.2x); the forwards take both names."""
    return "cache" if "cache" in {f.name for f in dataclasses.fields(output_class)} else "past_key_values"


def _unpadded(mask: torch.Tensor | None, name: str) -> None:
    """Cached decoding takes no padding: an all-ones mask is dropped, any other refused."""
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise ValueError(
            f"{name} has padding, which cached decoding cannot take (the recurrent FAVOR+ state has no "
            "padding mask): generate from prompts of equal length, e.g. one prompt at a time"
        )
    return None


def _check_no_extra_outputs(output_attentions: bool | None, output_hidden_states: bool | None) -> None:
    if output_attentions:
        raise ValueError("output_attentions: FAVOR+ never forms the attention matrix; there is none to return")
    if output_hidden_states:
        raise ValueError("output_hidden_states is not available for Performer models")


def _check_no_embeds(*embeds: torch.Tensor | None) -> None:
    if any(value is not None for value in embeds):
        raise ValueError("Performer models take token ids only (input_ids / decoder_input_ids), not embeddings")


@contextmanager
def _built_for_real() -> Iterator[None]:
    """transformers builds models on the meta device with the load dtype as default; the
    pretraining model is built on the CPU in float32 (it draws and checks its projections there),
    then cast, which keeps the projections in float32."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)
