"""``PerformerConfig``: an export's config.json as a transformers configuration.

The file is the export's own (performer/pretrained.py): ``format_version``, ``model_kind``, the
``model`` ModelConfig, dtype, projection record, ..., plus the keys transformers reads
(performer/hf_files.py). Both libraries read the same file, so ``performer.from_pretrained`` and
transformers open the same directory, and a transformers ``save_pretrained`` writes a directory
``performer.from_pretrained`` opens again.

transformers changes a few values in place (``resize_token_embeddings`` sets ``vocab_size``): the
top-level values win over the ``model`` entry, and ``to_dict`` writes them back into it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig

from performer import hf_files
from performer.config import ModelConfig
from performer.pretrained import CONFIG_FILE, FORMAT_VERSION, check_export_metadata, export_model_config

# Top-level transformers keys and the ModelConfig field each mirrors.
_MIRRORED = {"vocab_size": "vocab_size", "pad_token_id": "pad_id", "tie_word_embeddings": "tie_embeddings"}


class PerformerConfig(PreTrainedConfig):
    """The configuration of a Performer export (seq2seq or LM) for transformers.

    ``model`` holds the ``performer.config.ModelConfig`` fields; ``model_kind`` says which model
    class fits ("seq2seq": ``PerformerForConditionalGeneration``, "lm": ``PerformerForCausalLM``).
    """

    model_type = hf_files.MODEL_TYPE
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    format_version: int = FORMAT_VERSION
    model_kind: str = "seq2seq"
    model: dict | None = None
    vocab_size: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool | None = None
    use_cache: bool = True
    # The export's record, kept so a transformers save_pretrained writes a complete export again.
    projections: dict | None = None
    tied_weights: dict | None = None
    tokenizer: str | None = None
    parameters: int | None = None
    card: dict | None = None
    torch_version: str | None = None
    weights_sha256: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.model is None:
            self.model = ModelConfig().to_dict()
        if self.dtype is None:
            self.dtype = torch.float32
        if self.tied_weights is None:
            self.tied_weights = {}
        source = self._config_path()
        check_export_metadata(
            {"format_version": self.format_version, "model_kind": self.model_kind, "dtype": _dtype_name(self.dtype)},
            source,
        )
        if not hf_files.is_transformers_kind(self.model_kind):
            raise ValueError(
                f"{source}: model_kind {self.model_kind!r} has no transformers class "
                f"(these do: {', '.join(hf_files.MODEL_CLASSES)}); load it with performer.from_pretrained"
            )
        defaults = ModelConfig().to_dict()
        for key, field in _MIRRORED.items():
            if getattr(self, key) is None:
                setattr(self, key, self.model.get(field, defaults[field]))
        if self.model_kind == "seq2seq" and self.decoder_start_token_id is None:
            start = self.model.get("decoder_start_id")
            self.decoder_start_token_id = self.pad_token_id if start is None else start
        self.is_encoder_decoder = self.model_kind == "seq2seq"
        self.model_config()  # unknown or bad keys in "model": an error now, naming the file

    def _config_path(self) -> str:
        name = self.name_or_path
        if name and Path(name).is_dir():
            return str(Path(name) / CONFIG_FILE)
        return f"{name}/{CONFIG_FILE}" if name else "the Performer config"

    def model_values(self) -> dict[str, Any]:
        """The ``model`` entry with the top-level values transformers may have changed."""
        values = dict(self.model)
        for key, field in _MIRRORED.items():
            values[field] = getattr(self, key)
        values["decoder_start_id"] = self.decoder_start_token_id if self.model_kind == "seq2seq" else None
        return values

    def model_config(self) -> ModelConfig:
        """The ModelConfig the model is built from (automatic redraws off, as in every export)."""
        directory = Path(self.name_or_path) if self.name_or_path else Path(".")
        config = export_model_config(self.model_values(), directory)
        return dataclasses.replace(config, gradient_checkpointing=0)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["model"] = self.model_values()
        output["auto_map"] = hf_files.auto_map(self.model_kind)
        # transformers rewrites the weights: the export's checksum would no longer match them.
        output.pop("weights_sha256", None)
        return output

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """No-op: the export's remote code is written by hf_files, not copied from this module by transformers."""


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
