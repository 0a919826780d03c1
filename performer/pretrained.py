"""Fixed-feature exports: safetensors weights + ``config.json`` (+ tokenizer + model card).

An export directory::

    model.safetensors   every parameter and buffer (safetensors: no pickle, safe to load from anyone)
    config.json         format_version, model_kind, the ModelConfig, dtype, projection and tie info
    tokenizer/          a copy of the tokenizer directory, when one was given
    README.md           a short model card

plus, for seq2seq and LM exports, what makes the directory a Hugging Face transformers model
(performer/hf_files.py): transformers' keys in config.json, generation_config.json, remote code
(``performer.hf``, or the export's copy of the library's model modules where performer is not
installed), and a fast tokenizer (tokenizer.json, tokenizer_config.json) built from the
SentencePiece model.

Rules (the redraw rules of performer/redraw.py; the pickle policy of docs/reliability.md, "Security"):
* The FAVOR+ projections are part of the model: they are stored (always float32, whatever the
  weight dtype), marked fixed (``projection_fixed`` is True in the file) and automatic redraw is
  off in the stored config, so a fine-tuner sees exactly the features the model was trained with.
* safetensors refuses tensors that share memory, so a tensor stored under several names (tied
  weights) is written once and its other names are listed in ``config.json`` ("tied_weights");
  loading puts the one tensor back under every name and re-ties parameters.
* Exports are written into a temporary sibling directory and renamed into place, so a crash
  never leaves a half-written export under the final name.

The model library only: no DeepSpeed, YAML, ``data`` or ``launcher`` imports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from performer import hf_files
from performer.config import ModelConfig
from performer.errors import InputError
from performer.models import MODEL_CLASSES, build_model, is_projection_key

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
TOKENIZER_DIR = "tokenizer"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The short names of the run config's precision and of the command line, for the same three.
SHORT_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_named(name: str) -> torch.dtype:
    """float32 / bfloat16 / float16, or their short names fp32 / bf16 / fp16."""
    full = SHORT_DTYPE_NAMES.get(name, name)
    if full not in DTYPES:
        raise ExportError(f"unknown dtype {name!r}; choose one of {', '.join([*SHORT_DTYPE_NAMES, *DTYPES])}")
    return DTYPES[full]


# Prefixes that wrappers put in front of every key (DDP/DeepSpeed engines, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ExportError(InputError, ValueError):
    """An export that cannot be written or read; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------- save


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    model_kind: str,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: str | os.PathLike | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Export a pretraining model (``performer.models``); the model itself is left untouched.

    model_kind: "seq2seq", "lm" or "encoder" (must match the model's class).
    dtype: weight dtype in the file (float32, bfloat16 or float16); projections stay float32.
    tokenizer_dir: copied, whatever files it holds, to ``out_dir/tokenizer``.
    card: facts for the model card (data, steps, tokens, eval loss, ...), rendered as a table.
    Returns the export directory.
    """
    _check_kind(model_kind)
    if not isinstance(model, MODEL_CLASSES[model_kind]):
        raise ExportError(
            f"model_kind={model_kind!r} but the model is a {type(model).__name__}; "
            f"pass the kind of its class ({_kind_of(model)!r})"
        )
    return save_pretrained_from_state_dict(
        model.state_dict(), model.config, model_kind, out_dir, dtype=dtype, tokenizer_dir=tokenizer_dir, card=card
    )


def save_pretrained_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    model_kind: str,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: str | os.PathLike | None = None,
    card: Mapping[str, Any] | None = None,
    trained_steps: tuple[int, int] | None = None,
    blend: tuple[int, float] | None = None,
) -> Path:
    """Export from a plain state dict, e.g. DeepSpeed's consolidated fp32 weights.

    Every parameter must be there, and for a FAVOR+ model the projection buffers too (they are
    what the model was trained with; drawing new ones would silently change the model). Keys may
    carry a wrapper prefix ("module.", "_orig_mod."); it is removed. trained_steps: the first and
    last optimizer steps that trained with these projections, recorded in config.json; blend:
    (next draw, weight) when they are a smooth redraw's blend of the stored draw and the next.
    """
    _check_kind(model_kind)
    dtype_name = _dtype_name(dtype)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise ExportError(
            f"tokenizer directory {tokenizer_dir} does not exist; pass the directory "
            "that holds tokenizer.model and tokenizer.json, or no tokenizer"
        )
    state_dict = _strip_wrapper_prefix(dict(state_dict))
    export_config = _frozen_features_config(config)
    special, fast_tokenizer = _transformers_tokenizer(tokenizer_dir, model_kind, export_config)
    model = _build_quietly(model_kind, export_config)
    state_dict = _with_projections_checked(model, state_dict)
    _load_strictly(model, state_dict, source="the state dict")
    model.fix_projection_matrices_()

    projection_state = model.projection_state()
    if projection_state is not None:
        # The real seed, for the record (and so building the model on load draws no seed from
        # the global generator); the stored projections replace whatever the build draws.
        export_config = dataclasses.replace(export_config, projection_seed=projection_state[0])
    tensors, tied = _unshared_tensors(state_dict, model.state_dict(), dtype)
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_kind": model_kind,
        "model": export_config.to_dict(),
        "dtype": dtype_name,
        "projections": None
        if projection_state is None
        else {
            "fixed": True,
            "dtype": "float32",
            "base_seed": projection_state[0],
            "redraw_step": projection_state[1],
            "nb_features": model.favor_attentions()[0].nb_features,
            "trained_steps": list(trained_steps) if trained_steps else None,
            **({"blend": {"next_draw": blend[0], "weight": blend[1]}} if blend else {}),
        },
        "tied_weights": tied,
        "tokenizer": TOKENIZER_DIR if tokenizer_dir is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "card": {str(key): _plain(value) for key, value in (card or {}).items()},
        "torch_version": torch.__version__,
    }
    if hf_files.is_transformers_kind(model_kind):
        metadata.update(hf_files.config_keys(model_kind, metadata["model"], special))
    return _write_atomically(
        Path(out_dir), lambda tmp: _write_files(tmp, tensors, metadata, tokenizer_dir, special, fast_tokenizer)
    )


def _transformers_tokenizer(
    tokenizer_dir: str | os.PathLike | None, model_kind: str, config: ModelConfig
) -> tuple[dict[str, int] | None, dict[str, Any] | None]:
    """The tokenizer's special ids and its fast-tokenizer serialization (None, None without a
    tokenizer; no serialization for encoder-only exports), checked before anything is written."""
    if tokenizer_dir is None:
        return None, None
    try:
        special = hf_files.read_special_ids(Path(tokenizer_dir))
        if special.get("vocab_size") != config.vocab_size:
            raise hf_files.TokenizerConversionError(
                f"{tokenizer_dir} has {special.get('vocab_size')} ids but the model {config.vocab_size}; "
                "pass the tokenizer the model was trained with"
            )
        if not hf_files.is_transformers_kind(model_kind):
            return special, None
        return special, hf_files.fast_tokenizer(Path(tokenizer_dir), special, model_kind)
    except hf_files.TokenizerConversionError as error:
        raise ExportError(str(error)) from None


def _frozen_features_config(config: ModelConfig) -> ModelConfig:
    """The config as exported: automatic redraw off, so loading never schedules a redraw."""
    if not isinstance(config, ModelConfig):
        raise ExportError(f"config must be a performer.config.ModelConfig, got {type(config).__name__}")
    return dataclasses.replace(config, feature_redraw_interval=None, auto_check_redraw=False)


def _with_projections_checked(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict, after checking it holds the projections; absent fixed flags are filled in.

    The projections and the seeds they were drawn from must come from the caller: drawing new ones
    would silently change the model. The fixed flags may be absent: the export sets them anyway.
    """
    flags = {name: value for name, value in model.state_dict().items() if name.endswith(".projection_fixed")}
    needed = [name for name in model.state_dict() if is_projection_key(name) and name not in flags]
    missing = [name for name in needed if name not in state_dict]
    if missing:
        raise ExportError(
            f"the state dict has no FAVOR+ projection buffers ({len(missing)} missing, e.g. {missing[0]}); "
            "export needs the projections the model was trained with: pass a state dict that includes "
            "buffers (model.state_dict(), or DeepSpeed's consolidated fp32 weights with buffers)"
        )
    return {**flags, **state_dict}


def _unshared_tensors(
    given: Mapping[str, torch.Tensor], fixed: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write (each stored once, contiguous, cast) and {alias: stored name} of ties.

    Ties are read from ``given`` (the caller's tensors: the same tensor under two names), values
    from ``fixed`` (the loaded model, whose projection_fixed flags are set).
    """
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, value in fixed.items():
        original = given.get(name, value)
        identity = (
            original.device,
            original.untyped_storage().data_ptr(),
            original.storage_offset(),
            tuple(original.shape),
            tuple(original.stride()),
            original.dtype,
        )
        if original.numel() and identity in seen:
            tied[name] = seen[identity]
            continue
        seen[identity] = name
        stored[name] = _cast_for_export(name, value, dtype)
    return stored, tied


def _cast_for_export(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Projections stay float32 (features are computed in float32 from them); integer and bool
    # buffers keep their type. clone(): no tensor of the file shares memory with another.
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and not is_projection_key(name):
        tensor = tensor.to(dtype)
    return tensor.contiguous().clone()


def _write_files(
    directory: Path, tensors: dict[str, torch.Tensor], metadata: dict, tokenizer_dir, special, fast_tokenizer
) -> None:
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
    metadata["weights_sha256"] = _sha256(directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / TOKENIZER_DIR)
    if hf_files.is_transformers_kind(metadata["model_kind"]):
        hf_files.write_transformers_files(directory, metadata, fast_tokenizer, special)
    (directory / CARD_FILE).write_text(render_card(metadata))


def check_out_dir(out_dir: Path) -> None:
    """ExportError unless ``out_dir`` can take an export: new, empty, or an export to replace."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file()):
        raise ExportError(f"{out_dir} exists and is not an export; choose an empty or new directory")


def _write_atomically(out_dir: Path, write) -> Path:
    """Run ``write(tmp_dir)`` on a sibling temp dir, then rename it to ``out_dir``.

    An existing ``out_dir`` is replaced only if it is empty or itself an export (never a user's
    unrelated directory). Between the two renames the old export sits under a hidden name.
    """
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        _publish_permissions(tmp)
        _fsync_tree(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "export")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _publish_permissions(directory: Path) -> None:
    # mkdtemp makes a private (0700) directory and safetensors a private file; an export is
    # meant to be shared, so give it the modes an ordinary mkdir / open would (the umask's).
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(directory: Path) -> None:
    # Data on disk before the rename makes it visible: a power cut then leaves the old state.
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def render_card(metadata: Mapping[str, Any]) -> str:
    """The README.md of an export: what it is, the card facts as a table, how to load it."""
    config, kind = metadata["model"], metadata["model_kind"]
    attention = config["attention_type"]
    projections = metadata.get("projections")
    if projections:
        attention += f" ({projections['nb_features']} random features per head, fixed"
        if projections.get("trained_steps"):
            first, last = projections["trained_steps"]
            drawn = f"draw {projections['redraw_step']}"
            if projections.get("blend"):
                drawn = (
                    f"a blend of draws {projections['redraw_step']} and {projections['blend']['next_draw']} "
                    f"(weight {projections['blend']['weight']:.3f})"
                )
            steps = f"step {first}" if first == last else f"steps {first}-{last}"
            attention += f"; {drawn}, trained with in {steps}"
        attention += ")"
    layers = {
        "seq2seq": f"{config['num_encoder_layers']} encoder + {config['num_decoder_layers']} decoder",
        "lm": f"{config['num_decoder_layers']} decoder",
        "encoder": f"{config['num_encoder_layers']} encoder",
    }
    rows = {
        "model kind": f"{kind} ({_KIND_DESCRIPTIONS[kind]})",
        "parameters": f"{metadata['parameters']:,}",
        "layers": layers[kind],
        "width / heads": f"{config['d_model']} / {config['num_heads']}",
        "attention": attention,
        "vocabulary": config["vocab_size"],
        "weights dtype": metadata["dtype"],
        **{str(key): value for key, value in metadata["card"].items()},
    }
    table = "\n".join(f"| {key} | {_cell(value)} |" for key, value in rows.items())
    tokenizer = ", the tokenizer in `tokenizer/`" if metadata.get("tokenizer") else ""
    fixed = (
        " The random features are part of the model: they are never redrawn after loading."
        if (metadata.get("projections"))
        else ""
    )
    transformers = ""
    if hf_files.is_transformers_kind(kind):
        auto = hf_files.AUTO_MODEL_CLASSES[kind]
        tokenizer_line = (
            '\ntokenizer = AutoTokenizer.from_pretrained("path/to/this/directory", trust_remote_code=True)'
            if metadata.get("tokenizer")
            else ""
        )
        transformers = (
            "With Hugging Face transformers (the remote code is the performer library's; without "
            "`import performer`, pass `trust_remote_code=True`):\n\n"
            f"```python\nfrom transformers import {auto}, AutoTokenizer\n"
            f'model = {auto}.from_pretrained("path/to/this/directory", trust_remote_code=True)'
            f"{tokenizer_line}\n```\n\n"
        )
    return (
        f"# Performer {kind} model\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "## Loading\n\n"
        '```python\nimport performer\nmodel = performer.from_pretrained("path/to/this/directory")\n```\n\n'
        f"{transformers}"
        f"Weights are in `model.safetensors`, the architecture in `config.json`{tokenizer}.{fixed}\n"
    )


_KIND_DESCRIPTIONS = {"seq2seq": "encoder-decoder", "lm": "decoder-only language model", "encoder": "encoder-only"}


def _plain(value: Any) -> Any:
    """A card value as JSON can hold it: numpy / torch scalars become numbers, the rest text."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:
        return value.item()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------- load


def from_pretrained(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load an export: PerformerSeq2Seq / PerformerLM / PerformerEncoderModel in eval mode.

    dtype: None = the dtype stored in the export. Projections are float32 and fixed: neither
    automatic nor explicit redraws change them. Weights load strictly (missing or unexpected
    keys are an error). Torch's global random state is left as it was.
    """
    directory = Path(path)
    metadata = read_export_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: {WEIGHTS_FILE} is missing; the export is incomplete, export again")
    expected_sha = metadata.get("weights_sha256")
    if expected_sha is not None and _sha256(weights) != expected_sha:
        raise ExportError(f"{weights} does not match the sha256 in {CONFIG_FILE}: the file is corrupted; export again")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{weights} is not a readable safetensors file ({error}); export again") from None

    config = _config_from(metadata, directory)
    model = _build_quietly(metadata["model_kind"], config)
    model.to(dtype or DTYPES[metadata["dtype"]])  # projections stay float32 (Attention._apply)
    for alias, stored in (metadata.get("tied_weights") or {}).items():
        if stored in tensors:
            tensors[alias] = tensors[stored]
    _load_strictly(model, tensors, source=str(weights))
    _retie(model, (metadata.get("tied_weights") or {}))
    model.fix_projection_matrices_()
    return model.to(device).eval()


def read_export_config(directory: Path) -> dict[str, Any]:
    """config.json of an export, checked: format version, model kind, dtype."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no export at {directory}: write one with `performer export` or performer.pretrained.save_pretrained"
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; it is not an export (or an incomplete one)")
    try:
        metadata = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{config_path} is not valid JSON ({error}); the export is corrupted, export again") from None
    check_export_metadata(metadata, config_path)
    return metadata


def check_export_metadata(metadata: Any, config_path: Path | str) -> None:
    """ExportError unless ``metadata`` (config.json's content) is an export this library reads:
    format version, model kind, dtype; the message names ``config_path`` and the fix."""
    if not isinstance(metadata, dict):
        raise ExportError(f"{config_path} is not a JSON object; the export is corrupted, export again")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{config_path}: format_version {version!r} is not supported (this library reads "
            f"{FORMAT_VERSION}); use the performer version that wrote it, or export again"
        )
    if metadata.get("model_kind") not in MODEL_CLASSES:
        raise ExportError(
            f"{config_path}: unknown model_kind {metadata.get('model_kind')!r}; "
            f"expected one of {', '.join(MODEL_CLASSES)}"
        )
    if metadata.get("dtype") not in DTYPES:
        raise ExportError(
            f"{config_path}: unknown dtype {metadata.get('dtype')!r}; expected one of {', '.join(DTYPES)}"
        )


def _config_from(metadata: Mapping[str, Any], directory: Path) -> ModelConfig:
    return export_model_config(metadata["model"] if "model" in metadata else None, directory)


def export_model_config(values: Any, directory: Path) -> ModelConfig:
    """The ModelConfig of an export's config.json ``model`` entry, as loading builds it: features
    frozen, a projection seed set; an ExportError naming the file and the key otherwise."""
    config_path = directory / CONFIG_FILE
    if not isinstance(values, Mapping):
        raise ExportError(f'{config_path} has no "model" entry; the export is incomplete, export again')
    try:
        values = dict(values)
        if "decoder_start_id" not in values:
            values["decoder_start_id"] = _tokenizer_bos(directory)
        config = ModelConfig.from_dict(values)
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(
            f'{config_path}: bad model config ({error}); correct that key of "model" in {config_path.name}, '
            "or export again"
        ) from None
    # A seed, so building the model draws nothing from the global generator (the file's
    # projections replace whatever is drawn).
    return _frozen_features_config(dataclasses.replace(config, projection_seed=config.projection_seed or 0))


def _tokenizer_bos(directory: Path) -> int | None:
    """The bos id of the export's tokenizer, for exports written before configs recorded the
    decoder start (the trainer always started targets from bos); None without a tokenizer."""
    info = directory / TOKENIZER_DIR / "tokenizer.json"
    try:
        return int(json.loads(info.read_text())["special"]["bos_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Make every tied parameter alias the very same Parameter again (tied = trained together)."""
    for alias, stored in tied.items():
        try:
            shared = model.get_parameter(stored)
        except AttributeError:
            continue  # a buffer: the value was loaded, there is nothing to train together
        owner_name, _, leaf = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        if getattr(owner, leaf) is not shared:
            setattr(owner, leaf, shared)


# ---------------------------------------------------------------------------------------- shared


def _load_strictly(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ExportError(
            f"the weights in {source} do not fit the {type(model).__name__} of the config: "
            f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}; the config and the "
            "weights come from different models (or the export is incomplete): export again"
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ExportError(f"the weights in {source} do not fit the model of the config: {error}") from None


def _build_quietly(model_kind: str, config: ModelConfig) -> nn.Module:
    # Building initialises weights from torch's global generator; the caller's random state
    # (their data order, dropout...) must not depend on whether they loaded a model.
    with torch.random.fork_rng(devices=[]):
        return build_model(model_kind, config)


def _strip_wrapper_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(name.startswith(prefix) for name in state_dict):
            state_dict = {name[len(prefix) :]: value for name, value in state_dict.items()}
    return state_dict


def _check_kind(model_kind: str) -> None:
    if model_kind not in MODEL_CLASSES:
        raise ExportError(f"unknown model_kind {model_kind!r}; choose one of {', '.join(MODEL_CLASSES)}")


def _kind_of(model: nn.Module) -> str | None:
    return next((kind for kind, cls in MODEL_CLASSES.items() if isinstance(model, cls)), None)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ExportError(f"export dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _few(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}]"
