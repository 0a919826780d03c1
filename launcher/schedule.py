"""The learning-rate schedule: linear warmup, then cosine decay to a floor.

The rate is a pure function of the optimizer step, set on the optimizer right before each step,
so the rate a step uses is known when it is logged, nothing needs checkpointing, and a resumed
run continues on the same curve. Steps count from 1:

    step s <= warmup:   peak * s / warmup                     (step 1 already learns)
    warmup < s <= max:  floor + (peak - floor) * (1 + cos(pi * (s - warmup) / (max - warmup))) / 2
                        with floor = peak * min_lr_ratio      (exactly the floor at max_steps)

DeepSpeed's WarmupCosineLR starts at 0 and is stepped after each optimizer step, so its first two
steps run at rate 0, it never reaches the peak, it ends one step short of the floor, and
``engine.get_lr()`` after a step reports the next step's rate; it also stays put on a step skipped
for fp16 overflow, while the step count moves on.
"""

from __future__ import annotations

import math


def learning_rate(step: int, peak: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The rate optimizer step ``step`` (>= 1) uses."""
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    warmup_steps = min(warmup_steps, max_steps)
    if step <= warmup_steps:
        return peak * step / warmup_steps
    floor = peak * min_lr_ratio
    if step >= max_steps:
        return floor
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, rate: float) -> None:
    """Every parameter group of ``optimizer`` (a torch optimizer or a DeepSpeed wrapper) at ``rate``."""
    for group in optimizer.param_groups:
        group["lr"] = rate
