"""The only place the DeepSpeed JSON is built.

From the typed run config: ZeRO stage and offload, bf16 / fp16 (dynamic loss scaling), gradient
clipping, the batch triad (micro x accumulation x data-parallel = global, asserted) and AdamW.
The learning-rate schedule is not DeepSpeed's: the trainer sets each step's rate
(launcher/schedule.py says why). A ``deepspeed:`` block in the run config is merged on top, except for
keys the typed config owns.
"""

from __future__ import annotations

from typing import Any

from launcher.config import ConfigError, RunConfig, deep_merge

# Owned by the typed config: setting them in the passthrough block would silently fork the truth.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
    "zero_optimization",
)


def global_batch_size(config: RunConfig, data_parallel_size: int) -> int:
    """micro x accumulation x data-parallel ranks; checked against train.global_batch_size if set."""
    size = config.train.micro_batch_size * config.train.grad_accum * data_parallel_size
    wanted = config.train.global_batch_size
    if wanted is not None and wanted != size:
        raise ConfigError(
            f"train.global_batch_size={wanted} but train.micro_batch_size ({config.train.micro_batch_size}) "
            f"x train.grad_accum ({config.train.grad_accum}) x ranks ({data_parallel_size}) = {size}; "
            "change one of them or drop train.global_batch_size"
        )
    return size


def _zero_section(config: RunConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": config.zero.stage}
    if config.zero.stage >= 1:
        zero.update(overlap_comm=config.zero.overlap_comm, contiguous_gradients=True)
    if config.zero.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if config.zero.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if config.zero.stage >= 1 and config.zero.bucket_elements is not None:
        # DeepSpeed's 5e8-element default buckets are sized for billion-parameter models: on a small
        # one the bucket alone outweighs the model states (benchmarks/zero_memory.py).
        zero.update(reduce_bucket_size=config.zero.bucket_elements, allgather_bucket_size=config.zero.bucket_elements)
        if config.zero.stage == 3:
            zero["stage3_prefetch_bucket_size"] = config.zero.bucket_elements
    if config.zero.stage == 3 and config.zero.persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = config.zero.persistence_threshold
    if config.zero.stage == 3:
        # Gather 16-bit weights on save so exports need no extra pass; tied embeddings are shared
        # parameters, which stage 3 handles as long as they are used through the same module.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def build_deepspeed_config(config: RunConfig, data_parallel_size: int) -> dict[str, Any]:
    train = config.train
    ds: dict[str, Any] = {
        "train_batch_size": global_batch_size(config, data_parallel_size),
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": config.optimizer.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                # The peak; the trainer sets each step's rate (launcher/schedule.py), so there
                # is no DeepSpeed scheduler.
                "lr": config.optimizer.lr,
                "betas": list(config.optimizer.betas),
                "eps": config.optimizer.eps,
                # Per parameter group (performer.optim.weight_decay_groups): matrices decay,
                # norms, biases and embeddings do not.
                "weight_decay": config.optimizer.weight_decay,
                # torch.optim.AdamW: no fused CUDA op to build, same numbers on every accelerator.
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {
            "enabled": config.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": _zero_section(config),
        # Our own metrics and progress bar report; DeepSpeed's would interleave on every rank.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if config.zero.offload != "none":
        # Keep torch's AdamW with offloaded states instead of requiring the compiled CPU Adam.
        ds["zero_force_ds_cpu_optimizer"] = False
    collisions = sorted(set(config.deepspeed) & set(OWNED_KEYS))
    if collisions:
        raise ConfigError(
            f"deepspeed.{collisions[0]} is set by the typed config (keys {', '.join(collisions)}); "
            "use train.*, optimizer.*, schedule.*, precision or zero.* instead"
        )
    return deep_merge(ds, config.deepspeed)
