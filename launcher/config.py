"""The run configuration: a typed tree, YAML layering, dotted overrides, validation, derived values.

    config = load_config(["configs/tiny.yaml", "configs/zero2.yaml"], ["train.max_steps=50"])

Files are merged in order (later files win, mappings merge key by key); each ``--set a.b=c`` is then
applied, its value parsed as YAML (``3`` is an int, ``null`` is None, ``[1, 2]`` a list). Unknown
keys at any depth fail before any work with a "did you mean" hint, and values of the wrong type
name their key. Derived values (global batch, vocabulary size...) are computed once, in
``launcher.pretrain``, not re-derived elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from data.mixture import SourceConfig
from performer import strict
from performer.config import PRESETS, ModelConfig
from performer.errors import ConfigError
from performer.feature_maps import pretraining_nb_features

__all__ = ["ConfigError", "RunConfig", "ModelSection", "load_config", "config_from_dict", "save_config"]

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_MANIFEST = "runs/data/train"
OFFLOADS = ("none", "optimizer", "all")
MODEL_KINDS = ("seq2seq", "lm")

# ModelConfig fields the trainer sets (from the tokenizer, the run's seed and its redraw schedule):
# a value in the run config would be silently replaced, so it is refused with where the value comes from.
DERIVED_MODEL_FIELDS = {
    "vocab_size": "the tokenizer's vocabulary size",
    "pad_id": "the tokenizer's pad id",
    "decoder_start_id": "the tokenizer's bos id, which every training target starts with",
    "projection_seed": "the run's seed (one integer broadcast from rank 0)",
    "auto_check_redraw": "the trainer, which redraws at optimizer steps (model.feature_redraw_interval)",
    "num_classes": "nothing: classification heads are for fine-tuning encoder-only models, not pretraining",
}
# Settings that were renamed (the guide's names): the old spelling's error names the new one, and
# configs saved with it (checkpoints, run directories) still load (config_from_dict).
RENAMED_MODEL_FIELDS = {
    "redraw_interval": "feature_redraw_interval",
    "activation_checkpointing": "gradient_checkpointing",
}
RENAMED_KEYS = {
    **{f"model.{old}": f"model.{new}" for old, new in RENAMED_MODEL_FIELDS.items()},
    "model.overrides": "the ModelConfig fields directly under model: (e.g. model.d_model)",
    "data.shuffle_buffer": "data.interleave_shards (epochs are shuffled in windows of shards, data/plan.py)",
}
# Settings that no longer exist, dropped when a saved config (a checkpoint's, a run directory's) is loaded.
RETIRED_DATA_KEYS = ("shuffle_buffer",)
# What does not change parameter shapes: resuming with another value is allowed.
NON_SHAPE_MODEL_FIELDS = ("dropout", "feature_redraw_interval", "redraw_mode", "gradient_checkpointing", "chunk_size")


@dataclass
class ModelSection(ModelConfig):
    """The run's model: every ``performer.config.ModelConfig`` field (d_model, num_heads, norm,
    position, ...) directly under ``model:``, each the named preset's value unless set, plus the
    three settings below. The fields in DERIVED_MODEL_FIELDS are the trainer's to set."""

    preset: str = "tiny"
    (
        "Named size whose values fill the architecture fields not set here: tiny, small, medium or large "
        "(performer.config.PRESETS)."
    )
    kind: str = "seq2seq"
    "seq2seq (encoder-decoder, span corruption) or lm (decoder-only, causal LM)."
    redraw_mode: str = "smooth"
    (
        "smooth: each new draw is reached gradually over the interval, no step sees a jump; swap: replaced at once "
        "(the Performer paper's redraw; the loss jumps at each one: benchmarks/results/redraw.md)."
    )
    # Pretraining defaults that differ from the library's:
    nb_features: int | None = None
    (
        "FAVOR+ random features per head. Unset: max(256, round(D ln D)) for head dim D "
        "(performer.feature_maps.pretraining_nb_features: 256 at D=32, 266 at D=64), written into the saved "
        "config; null: the library's round(D ln D) (111 at D=32), what configs saved before this default hold."
    )
    feature_map: str = "favor++"
    (
        "favor++ (optimised positive features, lower variance, same cost: the best held-out loss measured, "
        "benchmarks/results/redraw.md) or favor+."
    )
    feature_redraw_interval: int | None = None
    (
        "Bring a new FAVOR+ projection draw in every N optimizer steps (all ranks, same seed); null = never (fixed "
        "features: the best held-out loss measured, benchmarks/results/redraw.md)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("model.preset", self.preset, tuple(PRESETS))
        _check_choice("model.kind", self.kind, MODEL_KINDS)
        _check_choice("model.redraw_mode", self.redraw_mode, ("smooth", "swap"))
        if self.feature_redraw_interval is not None and self.feature_redraw_interval < 1:
            raise ConfigError(
                f"model.feature_redraw_interval must be >= 1 or null (never), got {self.feature_redraw_interval}"
            )

    def model_config(self, **derived: Any) -> ModelConfig:
        """The library's ModelConfig of this section, with the trainer's DERIVED_MODEL_FIELDS."""
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{**{key: getattr(self, key) for key in names}, **derived})


def _model_values(values: Any) -> Any:
    """The model section's mapping with the preset's values under the keys given (derived ones refused)."""
    if not isinstance(values, Mapping):
        return values  # strict.build names the problem
    for key, source in DERIVED_MODEL_FIELDS.items():
        if key in values:
            raise ConfigError(f"model.{key} is set by the trainer from {source}; remove it from the config")
    preset = values.get("preset", ModelSection.preset)
    _check_choice("model.preset", preset, tuple(PRESETS))
    merged = {**PRESETS[preset], **values}
    if "nb_features" not in merged:
        # Written into the config (and so into every run directory, checkpoint and export) as a
        # number: a saved null keeps meaning the library's round(D ln D) it was trained with.
        head_dim = _head_dim(merged)
        if head_dim is not None:
            merged["nb_features"] = pretraining_nb_features(head_dim)
    return merged


def _head_dim(values: Mapping) -> int | None:
    """d_model // num_heads when both are positive integers that divide (else ModelConfig says what is wrong)."""
    d_model, heads = values.get("d_model"), values.get("num_heads")
    if isinstance(d_model, int) and isinstance(heads, int) and heads > 0 and d_model % heads == 0:
        return d_model // heads
    return None


@dataclass
class DataSection:
    manifest: str = DEFAULT_MANIFEST
    "Training split: a manifest.json written by `performer data shards`, or its directory."
    eval_manifest: str | None = None
    "Held-out split for eval; null = the `heldout` directory beside the training split, if any."
    objective: str = "span_corruption"
    "span_corruption (seq2seq) or causal_lm (lm)."
    input_length: int = 512
    "Tokens per input row (the encoder input for span corruption)."
    sources: tuple[SourceConfig, ...] = ()
    "Instead of data.manifest: a weighted mixture of prepared splits, a list of {manifest, weight, name}."
    num_workers: int = 0
    "DataLoader worker processes per rank."
    interleave_shards: int = 32
    "Shards whose documents are interleaved in each window of an epoch's order (data/plan.py)."
    verify_sha256: bool = True
    "Hash every shard at start-up (sizes and structure are always checked)."
    allow_pipe: bool = False
    "Accept `pipe:` shard commands (they run a shell command)."
    allow_remote: bool = False
    "Accept http(s)/s3/gs shard URLs."
    allow_shell_characters: bool = False
    "Accept shard paths holding shell metacharacters (; & | $ ` ' \" < > ( ) { } \\ newline), e.g. signed URLs with &."

    def __post_init__(self) -> None:
        if self.sources and self.manifest != DEFAULT_MANIFEST:
            raise ConfigError(
                "data.manifest and data.sources are both set: train on one split (data.manifest) or on a mixture "
                "(data.sources, each with its manifest), not both"
            )
        if self.interleave_shards < 1:
            raise ConfigError(f"data.interleave_shards must be >= 1, not {self.interleave_shards}")

    @property
    def train_manifest(self) -> str:
        """The training split (the first source of a mixture): where the tokenizer is found."""
        return self.sources[0].manifest if self.sources else self.manifest


@dataclass
class TrainSection:
    output_dir: str = "runs/tiny"
    "Run directory: resolved config, metrics.jsonl, TensorBoard logs, checkpoints/."
    max_steps: int = 100
    "Optimizer steps to train for."
    micro_batch_size: int = 8
    "Rows per rank per forward."
    grad_accum: int = 1
    "Micro-batches accumulated per optimizer step."
    global_batch_size: int | None = None
    "Optional check: must equal micro_batch_size x grad_accum x data-parallel ranks."
    max_consecutive_nonfinite: int = 5
    "Stop (with a checkpoint of the last good state) after this many non-finite losses in a row."
    time_budget_s: float | None = None
    "Wall-clock budget: save and exit cleanly (like a preemption) once it is spent."


@dataclass
class OptimizerSection:
    lr: float = 1e-3
    "Peak learning rate (AdamW)."
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    "AdamW betas."
    eps: float = 1e-8
    "AdamW epsilon."
    weight_decay: float = 0.01
    "Decoupled weight decay of the weight matrices (the kinds not listed in no_decay)."
    no_decay: list = field(default_factory=lambda: ["norms", "biases", "embeddings"])
    "Parameter kinds exempt from weight decay: any of norms, biases, embeddings, matrices (performer.optim)."
    grad_clip: float = 1.0
    "Clip the global gradient norm to this value; 0 = off."


@dataclass
class ScheduleSection:
    warmup_steps: int = 100
    "Linear warmup: optimizer step s <= warmup_steps runs at lr x s / warmup_steps (launcher/schedule.py)."
    min_lr_ratio: float = 0.1
    "Cosine decay from the peak after warmup to exactly lr x min_lr_ratio at train.max_steps."


@dataclass
class ZeroSection:
    stage: int = 0
    "ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."
    offload: str = "none"
    "none, optimizer (optimizer states on CPU) or all (optimizer and parameters; stage 3 only)."
    bucket_elements: int | None = None
    (
        "Stages 1-3: elements per gradient-reduction and all-gather bucket (DeepSpeed's reduce_bucket_size, "
        "allgather_bucket_size, stage3_prefetch_bucket_size); null = DeepSpeed's 5e8, a 1-2 GB buffer per rank "
        "whatever the model's size (ZeRO-3 holds it, ZeRO-1/2 allocate it at each backward)."
    )
    persistence_threshold: int | None = None
    (
        "Stage 3: parameters with fewer elements stay whole on every rank instead of partitioned "
        "(stage3_param_persistence_threshold); null = DeepSpeed's 1e5."
    )
    overlap_comm: bool = False
    (
        "Stages 1-3: reduce gradients while the backward runs (DeepSpeed's overlap_comm), at the cost of buffers of "
        "about 4.5x bucket_elements; off: it made steps on CPU ranks slower (benchmarks/step_overhead.py)."
    )


@dataclass
class CheckpointSection:
    interval: int = 50
    "Save every N optimizer steps (and at the end, on a preemption signal, on a budget)."
    keep: int = 3
    "Complete checkpoints kept; older ones are deleted after a newer one is committed."


@dataclass
class EvalSection:
    interval: int = 50
    "Evaluate on the held-out split every N optimizer steps (and at the end); 0 = never."
    batches: int = 8
    "Micro-batches per rank per evaluation."


@dataclass
class LogSection:
    interval: int = 10
    "Log metrics every N optimizer steps."
    tensorboard: bool = True
    "Write TensorBoard event files under <output_dir>/tensorboard."
    progress: bool = True
    "Console progress bar on rank 0."
    peak_flops_per_rank: float | None = None
    "Peak FLOP/s of one rank, for model FLOPs utilisation; null = measure a float32 GEMM at start."


@dataclass
class DistSection:
    timeout_s: float = 60.0
    "Collective timeout: a dead or hung rank ends the job after this long."


@dataclass
class RunConfig:
    seed: int = 0
    "Seed of everything random: init, data order, objectives, projection base seed."
    precision: str = "fp32"
    "fp32, bf16 or fp16 (dynamic loss scaling)."
    model: ModelSection = field(default_factory=lambda: strict.build(ModelSection, _model_values({}), "model"))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    dist: DistSection = field(default_factory=DistSection)
    deepspeed: dict = field(default_factory=dict)
    "Passthrough merged into the DeepSpeed JSON; keys the typed config owns are refused."

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("zero.offload", self.zero.offload, OFFLOADS)
        _check_choice("zero.stage", self.zero.stage, (0, 1, 2, 3))
        if self.zero.offload == "all" and self.zero.stage != 3:
            raise ConfigError(
                "zero.offload=all (parameter offload) needs zero.stage=3; use offload=optimizer below stage 3"
            )
        if self.zero.offload == "optimizer" and self.zero.stage == 0:
            # Stage 0 builds no ZeRO optimizer: DeepSpeed would silently keep the states on the device.
            raise ConfigError(
                "zero.offload=optimizer needs zero.stage >= 1 (stage 0 does not offload); set zero.stage=1"
            )
        expected_objective = {"seq2seq": "span_corruption", "lm": "causal_lm"}[self.model.kind]
        if self.data.objective != expected_objective:
            raise ConfigError(
                f"data.objective={self.data.objective!r} does not train model.kind={self.model.kind!r}; "
                f"set data.objective={expected_objective}"
            )
        for key in (
            "train.max_steps",
            "train.micro_batch_size",
            "train.grad_accum",
            "checkpoint.interval",
            "checkpoint.keep",
            "log.interval",
        ):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(getattr(self, section), name)}")
        if self.zero.bucket_elements is not None and self.zero.bucket_elements < 1:
            raise ConfigError(
                f"zero.bucket_elements must be >= 1 (or null for DeepSpeed's default), got {self.zero.bucket_elements}"
            )
        if self.zero.persistence_threshold is not None and self.zero.persistence_threshold < 0:
            raise ConfigError(
                f"zero.persistence_threshold must be >= 0 (or null), got {self.zero.persistence_threshold}"
            )
        from performer.optim import check_no_decay

        try:
            check_no_decay(self.optimizer.no_decay)
        except ValueError as error:
            raise ConfigError(f"optimizer.no_decay: {error}") from None
        if self.schedule.warmup_steps < 0 or not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ConfigError(
                "schedule.warmup_steps must be >= 0 and schedule.min_lr_ratio in [0, 1], got "
                f"{self.schedule.warmup_steps} and {self.schedule.min_lr_ratio}"
            )

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for key in DERIVED_MODEL_FIELDS:  # the trainer's; model_config.json holds what it set
            del values["model"][key]
        return values

    def fingerprint(self) -> str:
        """sha256 of the resolved config (what a checkpoint was trained with)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def model_fingerprint(self) -> str:
        """sha256 of what fixes the parameter shapes: resuming with another model is an error."""
        shape_keys = {k: v for k, v in self.to_dict()["model"].items() if k not in NON_SHAPE_MODEL_FIELDS}
        return hashlib.sha256(json.dumps(shape_keys, sort_keys=True).encode()).hexdigest()


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(map(str, choices))}")


# ------------------------------------------------------------------------------ layering


def deep_merge(base: dict, update: Mapping) -> dict:
    """Later wins; mappings merge key by key (a `deepspeed:` block too)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def parse_override(assignment: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}} with the value parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.max_steps=50), got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = [part for part in dotted.strip().split(".") if part]
    if not keys:
        raise ConfigError(f"--set has an empty key in {assignment!r}")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or error
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({problem}); quote it") from None
    for key in reversed(keys):
        value = {key: value}
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"config file {str(path)!r} {problem} (pass --config PATH to a YAML file, e.g. configs/tiny.yaml)"
        )
    try:
        text = path.read_text()
        if not text.strip():  # a comment-only file is a deliberate empty overlay; no bytes at all is not
            raise ConfigError(
                f"config file {str(path)!r} is empty (a failed copy?); write the settings in it, or leave it out"
            )
        loaded = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return loaded


def load_config(paths: list[str | Path], overrides: list[str] = ()) -> RunConfig:
    merged: dict = {}
    for path in paths:
        merged = deep_merge(merged, read_yaml(path))
    for assignment in overrides:
        merged = deep_merge(merged, parse_override(assignment))
    return build_run_config(merged)


def build_run_config(values: Any) -> RunConfig:
    """The one way from a mapping to a RunConfig: the preset under the model section, then strict.build."""
    if isinstance(values, Mapping):
        model = values.get("model")
        values = {**values, "model": _model_values({} if model is None else model)}
    return strict.build(RunConfig, values, renamed=RENAMED_KEYS)


def config_from_dict(values: Mapping) -> RunConfig:
    """A RunConfig from its to_dict() form (as saved with a run or a checkpoint), older layouts included."""
    data = values.get("data")
    if isinstance(data, Mapping) and any(key in data for key in RETIRED_DATA_KEYS):
        values = {**values, "data": {key: value for key, value in data.items() if key not in RETIRED_DATA_KEYS}}
    model = dict(values.get("model") or {})
    if "overrides" in model or any(old in model for old in RENAMED_MODEL_FIELDS):
        model = {RENAMED_MODEL_FIELDS.get(key, key): value for key, value in model.items() if key != "overrides"}
        model.update(values["model"].get("overrides") or {})
        values = {**values, "model": model}
    return build_run_config(values)


def save_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
