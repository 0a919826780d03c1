"""The files that make an export directory a Hugging Face ``transformers`` model directory.

Written beside an export's own files (model.safetensors, config.json, tokenizer/, README.md)::

    config.json                  + model_type, architectures, auto_map, token ids (the keys transformers reads)
    generation_config.json       decoder start, eos, pad: ``generate()`` starts and stops as pretraining did
    configuration_performer.py   remote code (``trust_remote_code=True``): each file imports its class
    modeling_performer.py        from ``performer.hf`` where the library is installed, else from
    tokenization_performer.py    the export's copy of its model modules:
    performer_*.py               performer.hf.modeling as performer_hf_modeling.py, ... (generated
                                 from the package at export time, never kept in the repository)
    tokenizer.json               the SentencePiece model as a ``tokenizers`` pipeline, sentinels as single tokens
    tokenizer_config.json        the transformers tokenizer class and the special tokens

Only json and sentencepiece here (no ``transformers`` or ``tokenizers`` import): ``performer export``
writes these files wherever it runs, and the classes that read them live in ``performer.hf``. The
bundle makes an export open where performer is not installed (torch, einops, safetensors and
transformers are enough); the maths stays one implementation, the package's, copied verbatim.

The fast tokenizer reproduces ``data.tokenizer.Tokenizer.encode`` (and, for text holding
``<extra_id_N>``, ``performer generate``'s prompt encoding): the Unigram pieces and scores of
``tokenizer.model``, the dummy prefix on the text's first segment only (never behind a sentinel),
spaces as "▁", byte fallback. Control and byte pieces get a score no path through ordinary pieces
reaches, so, as in SentencePiece, literal "</s>" or "<0x0A>" in a text is spelled out (provided
the model covers those ASCII characters, as any model trained on real text does).

Same ids, ties included: ``tokenizers`` adds scores in float64, SentencePiece in float32. The
project's tokenizers have scores rounded to multiples of 1/16 and encode long texts in runs of
lines (data/tokenizer.py, "Exact scores"), so both add exactly and break ties alike. A tokenizer
trained before that (scores not rounded) converts with a warning: on a few texts in 100 the two
pick another segmentation of equal or near-equal score.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

# The export's remote code, the transformers classes it names and the Auto class of each model kind.
REMOTE_CODE_MODULES = {
    "configuration_performer.py": ("performer.hf.configuration", "PerformerConfig"),
    "modeling_performer.py": ("performer.hf.modeling", "PerformerForConditionalGeneration, PerformerForCausalLM"),
    "tokenization_performer.py": ("performer.hf.tokenization", "PerformerTokenizerFast"),
}
MODEL_CLASSES = {"seq2seq": "PerformerForConditionalGeneration", "lm": "PerformerForCausalLM"}
AUTO_MODEL_CLASSES = {"seq2seq": "AutoModelForSeq2SeqLM", "lm": "AutoModelForCausalLM"}
MODEL_TYPE = "performer"
PROJECT_TOKENIZER_DIR = "tokenizer"  # the export's copy of the SentencePiece tokenizer (pretrained.TOKENIZER_DIR)
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CLASS = "PerformerTokenizerFast"
SENTINEL_FORMAT = "<extra_id_{}>"  # as data/tokenizer.py renders them

# SentencePiece piece types (sentencepiece_model.proto): only these are matched against text.
_MATCHED_PIECE_TYPES = (1, 4)  # NORMAL, USER_DEFINED
# Score of pieces SentencePiece never matches against text (control, unknown, byte): lower than
# any path of ordinary pieces, high enough that float64 keeps every ordinary score's digits.
_NEVER_MATCHED_SCORE = -1.0e4
_EXACT_SCORE_STEP = 2.0**-4  # data.tokenizer.SCORE_STEP: scores float32 and float64 add alike
_REMOTE_CODE = '''"""Remote code of a Performer export: the class is the performer library's (performer.hf).

The installed library when there is one (its classes are then the ones the program already has);
otherwise the copy of the library's model modules that the export carries (performer_*.py).
"""

try:  # transformers does not check imports inside a try block
    from {module} import {names}
except ImportError:
    from {dot}{bundled} import {names}
{whole_bundle}'''  # {dot}: transformers reads any line `from .x import` of a file, strings too
# The bundled copy of the library: each module of the package under a flat name (performer.hf.modeling
# -> performer_hf_modeling.py), its imports of the package made relative, as transformers' remote code
# loader wants (one directory, relative imports).
BUNDLE_PREFIX = "performer_"
_BUNDLE_ROOTS = tuple(module for module, _ in REMOTE_CODE_MODULES.values())
_PACKAGE_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)from performer(?P<path>(?:\.\w+)*) import (?P<names>.*)$", re.MULTILINE
)


def is_transformers_kind(model_kind: str) -> bool:
    """Whether transformers has a class for this kind of export (encoder-only exports: not yet)."""
    return model_kind in MODEL_CLASSES


def auto_map(model_kind: str) -> dict[str, Any]:
    """config.json's ``auto_map``: the remote-code class of each Auto class."""
    return {
        "AutoConfig": "configuration_performer.PerformerConfig",
        AUTO_MODEL_CLASSES[model_kind]: f"modeling_performer.{MODEL_CLASSES[model_kind]}",
        "AutoTokenizer": [None, f"tokenization_performer.{TOKENIZER_CLASS}"],
    }


def config_keys(model_kind: str, model: Mapping[str, Any], special: Mapping[str, int] | None) -> dict[str, Any]:
    """The keys transformers reads from config.json, for an export's ``model`` config and the
    special ids of its tokenizer (None without one)."""
    special = special or {}
    keys: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": [MODEL_CLASSES[model_kind]],
        "auto_map": auto_map(model_kind),
        "is_encoder_decoder": model_kind == "seq2seq",
        "vocab_size": model["vocab_size"],
        "tie_word_embeddings": model["tie_embeddings"],
        "pad_token_id": model["pad_id"],
        "bos_token_id": special.get("bos_id"),
        "eos_token_id": special.get("eos_id"),
        "use_cache": True,
    }
    if model_kind == "seq2seq":
        start = model.get("decoder_start_id")
        keys["decoder_start_token_id"] = model["pad_id"] if start is None else start
    return keys


def generation_config(keys: Mapping[str, Any]) -> dict[str, Any]:
    """generation_config.json from the config keys above."""
    names = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
    return {name: keys[name] for name in names if keys.get(name) is not None}


def write_remote_code(directory: Path) -> None:
    """The three remote-code files, and the bundled library modules they fall back on."""
    for file_name, (module, names) in REMOTE_CODE_MODULES.items():
        # Every entry point names every root, so each copies the whole bundle (a model's save then
        # writes the tokenizer's modules too).
        whole_bundle = "".join(
            f"    from .{bundled_name(root)} import __name__ as _{bundled_name(root)}\n" for root in _BUNDLE_ROOTS
        )
        code = _REMOTE_CODE.format(
            module=module, names=names, dot=".", bundled=bundled_name(module), whole_bundle=whole_bundle
        )
        (directory / file_name).write_text(code, encoding="utf-8")
    for file_name, source in bundle_sources().items():
        (directory / file_name).write_text(source, encoding="utf-8")


def bundled_name(module: str) -> str:
    """performer.hf.modeling -> performer_hf_modeling."""
    return module.replace(".", "_")


def bundle_sources() -> dict[str, str]:
    """{file name: source} of the bundled library: the modules the transformers classes import,
    transitively, with their imports of the package made relative. Read from the package itself,
    or, where this module runs from an export's bundle, copied from beside it."""
    here = Path(__file__).resolve().parent
    if __name__ != "performer.hf_files":  # running from a bundle: its files are the sources
        return {path.name: path.read_text(encoding="utf-8") for path in sorted(here.glob(f"{BUNDLE_PREFIX}*.py"))}
    sources: dict[str, str] = {}
    pending = list(_BUNDLE_ROOTS)
    while pending:
        module = pending.pop()
        file_name = bundled_name(module) + ".py"
        if file_name in sources:
            continue
        text = (here.parent / Path(*module.split("."))).with_suffix(".py").read_text(encoding="utf-8")
        sources[file_name], imported = _relative_imports(text)
        pending += imported
    return dict(sorted(sources.items()))


def _relative_imports(source: str) -> tuple[str, list[str]]:
    """``source`` with ``from performer.x import y`` as ``from .performer_x import y`` and
    ``from performer import x`` (a module) as ``from . import performer_x as x``; and the modules
    of the package it imports."""
    imported: list[str] = []

    def rewrite(match: re.Match) -> str:
        indent, path, names = match["indent"], match["path"], match["names"]
        if path:
            imported.append("performer" + path)
            return f"{indent}from .{bundled_name('performer' + path)} import {names}"
        lines = []
        for name in (part.strip() for part in names.split("#")[0].split(",")):
            module = f"performer.{name}"
            imported.append(module)
            # The first line is for transformers, which copies the files that `from .x import` names.
            lines.append(f"{indent}from .{bundled_name(module)} import __name__ as _{bundled_name(module)}")
            lines.append(f"{indent}from . import {bundled_name(module)} as {name}")
        return "\n".join(lines)

    return _PACKAGE_IMPORT.sub(rewrite, source), imported


def write_transformers_files(
    directory: Path, metadata: Mapping[str, Any], tokenizer: Mapping[str, Any] | None, special: Mapping[str, int] | None
) -> None:
    """Everything but config.json (whose keys come from ``config_keys``) into an export directory;
    ``tokenizer``: ``fast_tokenizer``'s serialization, None without a tokenizer."""
    write_remote_code(directory)
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config(metadata), indent=2) + "\n")
    if tokenizer is not None and special is not None:
        (directory / HF_TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n")
        config = tokenizer_config(tokenizer, special)
        (directory / HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------- tokenizer


class TokenizerConversionError(ValueError):
    """A tokenizer directory whose SentencePiece model cannot become a fast tokenizer."""


def read_special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """The special-id table of a project tokenizer (tokenizer/tokenizer.json, "special")."""
    info = tokenizer_dir / "tokenizer.json"
    try:
        special = json.loads(info.read_text(encoding="utf-8"))["special"]
        return {key: int(value) for key, value in special.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise TokenizerConversionError(
            f"{info} is not a tokenizer table ({type(error).__name__}: {error}); pass the directory "
            "`performer data prepare` wrote (tokenizer.model + tokenizer.json)"
        ) from None


def fast_tokenizer(tokenizer_dir: Path, special: Mapping[str, int], model_kind: str) -> dict[str, Any]:
    """tokenizer.json (the ``tokenizers`` serialization) of a project SentencePiece tokenizer.

    Post-processing frames a text the way pretraining did: seq2seq inputs end with eos, LM text
    follows an eos (``add_special_tokens=False`` gives the bare ids).
    """
    proto = _read_model_proto(tokenizer_dir / "tokenizer.model")
    _check_supported(proto, tokenizer_dir / "tokenizer.model")
    pieces = list(proto.pieces)
    if any(piece.score % _EXACT_SCORE_STEP for piece in pieces if piece.type in _MATCHED_PIECE_TYPES):
        warnings.warn(
            f"{tokenizer_dir / 'tokenizer.model'} was trained before scores were rounded: the fast tokenizer "
            "gives its ids except on a few texts in 100, where two segmentations score alike and float32 "
            "(SentencePiece) and float64 (tokenizers) break the tie differently; a tokenizer trained now "
            "(performer data tokenizer) gives the same ids on any text",
            stacklevel=2,
        )
    vocab_size, num_sentinels = int(special["vocab_size"]), int(special["num_sentinels"])
    if len(pieces) != vocab_size - num_sentinels:
        raise TokenizerConversionError(
            f"{tokenizer_dir}: tokenizer.model has {len(pieces)} pieces but tokenizer.json expects "
            f"{vocab_size - num_sentinels}; the two files come from different tokenizers: copy the directory again"
        )
    vocab = [
        [piece.piece, float(piece.score) if piece.type in _MATCHED_PIECE_TYPES else _NEVER_MATCHED_SCORE]
        for piece in pieces
    ]
    special_ids = sorted({special[name] for name in ("pad_id", "eos_id", "unk_id", "bos_id", "mask_id")})
    added = [_added_token(index, pieces[index].piece, special=True) for index in special_ids]
    # Sentinel i has id V-1-i: listed by ascending id, as tokenizers numbers added tokens.
    added += [
        _added_token(index, SENTINEL_FORMAT.format(vocab_size - 1 - index), special=False)
        for index in range(vocab_size - num_sentinels, vocab_size)
    ]
    eos = pieces[special["eos_id"]].piece
    eos_token = {"SpecialToken": {"id": eos, "type_id": 0}}
    text = {"Sequence": {"id": "A", "type_id": 0}}
    single = [text, eos_token] if model_kind == "seq2seq" else [eos_token, text]
    pair = [*single, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": eos, "type_id": 1}}]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        # Spaces become "▁" in every segment (between sentinels too); the dummy prefix is added to
        # the text's first segment only, even when it starts with a space (SentencePiece's rule,
        # which Metaspace alone skips): the first Metaspace prepends a plain space that the second
        # one turns into "▁".
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Metaspace", "replacement": " ", "prepend_scheme": "first", "split": False},
                {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": {eos: {"id": eos, "ids": [special["eos_id"]], "tokens": [eos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {"type": "Unigram", "unk_id": special["unk_id"], "vocab": vocab, "byte_fallback": True},
    }


def tokenizer_config(tokenizer: Mapping[str, Any], special: Mapping[str, int]) -> dict[str, Any]:
    """tokenizer_config.json: the class (remote code in the export) and the special tokens."""
    piece = {token["id"]: token["content"] for token in tokenizer["added_tokens"]}
    return {
        "tokenizer_class": TOKENIZER_CLASS,
        "auto_map": {"AutoTokenizer": [None, f"tokenization_performer.{TOKENIZER_CLASS}"]},
        "pad_token": piece[special["pad_id"]],
        "eos_token": piece[special["eos_id"]],
        "unk_token": piece[special["unk_id"]],
        "bos_token": piece[special["bos_id"]],
        "mask_token": piece[special["mask_id"]],
        # Literal "</s>" in a text is text, as in SentencePiece; sentinels (not "special") still match.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def _added_token(index: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": index,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _read_model_proto(path: Path):
    try:  # (a try block: transformers' check of a bundled copy's imports skips it)
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise TokenizerConversionError(f"reading {path} needs sentencepiece and protobuf ({error})") from None

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except OSError as error:
        raise TokenizerConversionError(f"cannot read {path} ({error}); copy the tokenizer directory again") from None
    except Exception as error:  # protobuf's DecodeError and friends
        raise TokenizerConversionError(
            f"{path} is not a SentencePiece model ({type(error).__name__}); copy the tokenizer directory again"
        ) from None
    if not proto.pieces:
        raise TokenizerConversionError(f"{path} is not a SentencePiece model (no pieces); copy it again")
    return proto


def _check_supported(proto, path: Path) -> None:
    """The settings data/tokenizer.py trains with; anything else would convert inexactly."""
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != 1:
        problems.append("model_type is not unigram (train with tokenizer.model_type=unigram)")
    if not trainer.byte_fallback:
        problems.append("byte_fallback is off")
    if normalizer.precompiled_charsmap or not normalizer.add_dummy_prefix or normalizer.remove_extra_whitespaces:
        problems.append("the normalizer is not identity + dummy prefix + kept whitespace")
    if trainer.treat_whitespace_as_suffix:
        problems.append("whitespace is a suffix")
    if problems:
        raise TokenizerConversionError(
            f"{path}: no exact fast tokenizer for this SentencePiece model: {'; '.join(problems)}; "
            "data/tokenizer.py's settings convert exactly"
        )
