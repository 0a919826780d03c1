"""The model and its DeepSpeed engine, built from the run config.

The model config comes from the preset, the typed model section and the data's special ids; the
engine from the one DeepSpeed JSON (``launcher.ds_config``) and AdamW over the weight-decay groups
(``performer.optim``).
"""

from __future__ import annotations

from launcher import hashed_writes
from launcher.config import RunConfig
from launcher.ds_config import build_deepspeed_config


def build_model_config(config: RunConfig, special):
    """The model section with the fields the trainer derives (launcher.config.DERIVED_MODEL_FIELDS)."""
    return config.model.model_config(
        vocab_size=special.vocab_size,
        pad_id=special.pad_id,
        # Every target row of the stream starts with bos (data/stream.py): generate() must too.
        decoder_start_id=special.bos_id,
        projection_seed=config.seed,
        # The trainer redraws at optimizer steps on every rank; the model never does on its own.
        auto_check_redraw=False,
        feature_redraw_interval=None,
    )


def build_engine(config: RunConfig, model, world_size: int, load_universal: bool = False):
    """The DeepSpeed engine over ``model``: the JSON from ``ds_config``, AdamW over the weight-decay
    groups (matrices decay; norms, biases and embeddings do not). Returns the engine and the groups'
    description for the start-up log."""
    import deepspeed

    from performer.optim import describe_groups, weight_decay_groups

    ds_config = build_deepspeed_config(config, world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    groups = weight_decay_groups(model, config.optimizer.weight_decay, config.optimizer.no_decay)
    described = describe_groups(groups)  # before ZeRO replaces the groups' tensors by flat partitions
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    hashed_writes.install(engine)  # checkpoint files hashed as they are written (launcher/checkpoint.py)
    return engine, described


def flops_per_micro_batch(model, config: RunConfig, target_length: int) -> float:
    """Counted training FLOPs of one micro-batch (``performer.models.training_flops``)."""
    from performer.models import training_flops

    batch = config.train.micro_batch_size
    return training_flops(model, batch * config.data.input_length, batch * target_length)
