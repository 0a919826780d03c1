"""When and how FAVOR+ projections are (re)drawn.

Rules:
* A projection is a pure function of (base seed, projection id, redraw step): two processes with the
  same base seed hold bitwise-equal projections, so a trainer only has to agree on one integer.
* Projection ids are assigned by the outermost module at construction, in ``modules()`` order,
  so they depend on the architecture alone.
* Redraws happen between forwards, never inside one: activation-checkpoint recompute and gradient
  accumulation then always see the features of the forward they belong to. Standalone users get
  ``feature_redraw_interval`` + ``auto_check_redraw``, counted once per training-mode call of the
  outermost module; a trainer calls ``redraw_projection_matrices_(seed=..., step=...)`` at
  optimizer-step boundaries instead.
* ``fix_projection_matrices_()`` freezes projections for good (stored in ``state_dict``).
* A redraw takes effect for the next optimizer step, never for the one just taken: whatever
  looks at the model at a step boundary (evaluation, a checkpoint, an export) sees the
  projection its last update trained with. ``RedrawSchedule`` says which draw trains which step.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from performer.attention.module import Attention

_depth = threading.local()


REDRAW_MODES = ("swap", "smooth")


@dataclass(frozen=True)
class RedrawSchedule:
    """Which projection trains which optimizer step, for a trainer that redraws every ``interval``
    steps (None = never: draw 0 trains every step).

    Steps count from 1; draws are named by the step after which they are made (draw 0, draw I,
    draw 2I, ...), each a pure function of (base seed, layer, draw).

    * ``swap``: draw kI trains steps kI + 1 .. (k + 1)I, and is replaced at once by the next one
      (the Performer paper's redraw). The model has co-adapted to the old draw: on the tiny
      config the train loss jumps and takes many steps to recover (benchmarks/results/redraw.md).
    * ``smooth``: the projection travels from draw kI (step kI + 1) to draw (k + 1)I (step
      (k + 1)I + 1) along cos/sin blends, one small move per step, every row exactly N(0, I)
      throughout (unbiased features); no step sees a jump (benchmarks/results/redraw.md).
    """

    interval: int | None = None
    mode: str = "swap"

    def __post_init__(self) -> None:
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"redraw interval must be >= 1 or None, got {self.interval}")
        if self.mode not in REDRAW_MODES:
            raise ValueError(f"redraw mode {self.mode!r}; choose one of {', '.join(REDRAW_MODES)}")

    def blend_for_step(self, step: int) -> tuple[int, int, float]:
        """(first draw, second draw, weight) of the projection step ``step`` trains with: the
        projection is cos(w pi/2) first + sin(w pi/2) second (weight 0: the first draw alone)."""
        draw = self.draw_for_step(step)
        if self.mode == "swap" or not self.interval or step <= 1:
            return draw, draw, 0.0
        return draw, draw + self.interval, ((step - 1) % self.interval) / self.interval

    def draw_for_step(self, step: int) -> int:
        """The draw that step ``step`` (>= 1) trains with (smooth: the one it moves away from); 0
        for step 0 (nothing trained)."""
        if not self.interval or step <= 1:
            return 0
        return ((step - 1) // self.interval) * self.interval

    def trained_steps(self, step: int) -> tuple[int, int] | None:
        """(first, last) steps that trained the projection in force after ``step`` steps; None if none did."""
        if step < 1:
            return None
        if self.mode == "smooth" and self.interval:
            return step, step  # every step of a smooth redraw has its own projection
        return self.draw_for_step(step) + 1, step

    def record(self, step: int, base_seed: int | None) -> dict:
        """What a checkpoint or an export says of the projection in force after ``step`` steps:
        base seed, draw (with ``next_draw`` and ``blend_weight`` mid-blend), trained steps."""
        first, second, weight = self.blend_for_step(max(step, 1))
        trained = self.trained_steps(step)
        record = {"base_seed": base_seed, "draw": first, "trained_steps": list(trained) if trained else None}
        if weight:
            record.update(next_draw=second, blend_weight=weight)
        return record

    def redraws_after(self, step: int) -> bool:
        """Whether the boundary after ``step`` brings a new draw in (swap: in force for step + 1;
        smooth: the blend starts toward it)."""
        return bool(self.interval) and step >= 1 and step % self.interval == 0

    def changes_after(self, step: int) -> bool:
        """Whether step + 1 trains with another projection than step ``step``."""
        if not self.interval or step < 1:
            return False
        return self.mode == "smooth" or self.redraws_after(step)


@contextmanager
def inside_forward() -> Iterator[None]:
    """Marks code that runs inside a forward (or its checkpoint recompute)."""
    _depth.value = getattr(_depth, "value", 0) + 1
    try:
        yield
    finally:
        _depth.value -= 1


def is_outermost_call() -> bool:
    return getattr(_depth, "value", 0) == 0


def projection_forward(forward: Callable) -> Callable:
    """Decorator for the forward of every ``ProjectionOwner``: the outermost call ticks redraws."""

    @functools.wraps(forward)
    def wrapper(self: "ProjectionOwner", *args, **kwargs):
        if is_outermost_call() and self.training:
            self.tick_auto_redraw()
        with inside_forward():
            return forward(self, *args, **kwargs)

    return wrapper


class ProjectionOwner(nn.Module):
    """Base of the guide's modules: owns the FAVOR+ projections of every attention below it."""

    feature_redraw_interval: int | None = None
    auto_check_redraw: bool = False
    forwards_since_redraw: int = 0

    def _setup_redraw(self, feature_redraw_interval: int | None, auto_check_redraw: bool) -> None:
        if feature_redraw_interval is not None and feature_redraw_interval < 1:
            raise ValueError(f"feature_redraw_interval must be >= 1 or None, got {feature_redraw_interval}")
        self.feature_redraw_interval = feature_redraw_interval
        self.auto_check_redraw = auto_check_redraw
        self.forwards_since_redraw = 0

    def favor_attentions(self) -> list[Attention]:
        return [module for module in self.modules() if isinstance(module, Attention) and module.uses_favor]

    def init_projections_(self, projection_seed: int | None) -> None:
        """Number every FAVOR+ attention below this module and draw step 0.

        ``projection_seed=None`` takes the base seed from torch's global generator, so
        ``torch.manual_seed`` makes the whole model reproducible, projections included.
        """
        if projection_seed is None:
            projection_seed = int(torch.randint(0, 2**62, ()).item())
        for projection_id, attention in enumerate(self.favor_attentions()):
            attention.projection_id = projection_id
        self.redraw_projection_matrices_(seed=projection_seed, step=0)

    def projection_state(self) -> tuple[int, int] | None:
        """(base seed, redraw step) of the current projections; None without FAVOR+ attention."""
        attentions = self.favor_attentions()
        if not attentions:
            return None
        seed, _, step = attentions[0].projection_draw.tolist()
        return int(seed), int(step)

    @torch.no_grad()
    def redraw_projection_matrices_(self, seed: int | None = None, step: int | None = None) -> None:
        """Draw the projection of every non-fixed FAVOR+ attention for (seed, its id, step).

        seed: base seed (default: the current one). step: redraw step (default: current + 1); a
        trainer passes its optimizer step so the projections are a function of the step alone.
        """
        state = self.projection_state()
        if state is None:
            return
        seed = state[0] if seed is None else int(seed)
        step = state[1] + 1 if step is None else int(step)
        for attention in self.favor_attentions():
            if not bool(attention.projection_fixed):
                attention.draw_projection_(seed, step)
        self.forwards_since_redraw = 0

    @torch.no_grad()
    def fix_projection_matrices_(self) -> None:
        """Freeze the current projections: no automatic or explicit redraw changes them again."""
        for attention in self.favor_attentions():
            attention.projection_fixed.fill_(True)
        for module in self.modules():
            if isinstance(module, ProjectionOwner):
                module.auto_check_redraw = False

    @torch.no_grad()
    def set_projections_for_step_(self, seed: int, step: int, schedule: RedrawSchedule) -> None:
        """The projections optimizer step ``step`` trains with under ``schedule`` (a trainer's
        call, before that step's first forward); fixed projections are left alone."""
        first, second, weight = schedule.blend_for_step(step)
        for attention in self.favor_attentions():
            if not bool(attention.projection_fixed):
                attention.blend_projection_(int(seed), first, second, weight)
        self.forwards_since_redraw = 0

    def tick_auto_redraw(self) -> None:
        """Count one training forward for every owner below with automatic redraw on."""
        for module in self.modules():
            if not (
                isinstance(module, ProjectionOwner) and module.auto_check_redraw and module.feature_redraw_interval
            ):
                continue
            if module.forwards_since_redraw >= module.feature_redraw_interval:
                module.redraw_projection_matrices_()
            module.forwards_since_redraw += 1
