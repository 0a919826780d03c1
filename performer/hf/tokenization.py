"""``PerformerTokenizerFast``: the fast tokenizer of an export (tokenizer.json, see performer/hf_files.py).

A transformers fast tokenizer with nothing added but the checks that name a missing file and the
fix; the pipeline itself (Unigram pieces, dummy prefix, byte fallback, sentinels) is in the file.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from performer import hf_files


class PerformerTokenizerFast(PreTrainedTokenizerFast):
    """Encodes as the project's SentencePiece tokenizer (``data.tokenizer.Tokenizer``), with
    ``<extra_id_N>`` as the single sentinel token N. Seq2seq exports append eos to a text, LM
    exports put one before it, as pretraining framed them (``add_special_tokens=False``: neither)."""

    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        directory = Path(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder") or ""
        if directory.is_dir():
            path = directory / subfolder / hf_files.HF_TOKENIZER_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the export has no fast tokenizer; export again with the tokenizer "
                    "(performer export, or performer.save_pretrained(..., tokenizer_dir=DIR))"
                )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoTokenizer") -> None:
        """No-op: the export's remote code is written by hf_files, not copied from this module by transformers."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, with the remote code and its ``auto_map`` entry, so the saved
        tokenizer opens with ``trust_remote_code=True`` where performer is not imported; the
        export's SentencePiece tokenizer (``tokenizer/``) goes along, so a directory holding a
        saved model and tokenizer is a whole export (``performer generate`` reads it)."""
        import json
        import shutil

        files = super().save_pretrained(save_directory, *args, **kwargs)
        directory = Path(save_directory)
        source = Path(self.name_or_path) / hf_files.PROJECT_TOKENIZER_DIR if self.name_or_path else None
        target = directory / hf_files.PROJECT_TOKENIZER_DIR
        if source is not None and source.is_dir() and not target.exists():
            shutil.copytree(source, target)
        config_path = directory / hf_files.HF_TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["tokenizer_class"] = hf_files.TOKENIZER_CLASS
            config.setdefault("auto_map", {})["AutoTokenizer"] = [None, f"tokenization_performer.{type(self).__name__}"]
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        hf_files.write_remote_code(directory)
        return files
