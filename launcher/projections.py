"""The FAVOR+ projections of a training run: set for each step on every rank, checked equal, recorded.

Which draw (or blend of two draws) trains which step is ``performer.redraw.RedrawSchedule``'s
business; here the ranks take it, prove they agree, and say what a checkpoint carries.
"""

from __future__ import annotations

import hashlib

from launcher.dist import gather_objects
from performer.redraw import RedrawSchedule


def projection_digest(model) -> str:
    """sha256 over every FAVOR+ projection, in module order."""
    digest = hashlib.sha256()
    for attention in model.favor_attentions():
        digest.update(attention.projection.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def set_projections_everywhere(model, seed: int, step: int, redraws: RedrawSchedule, check: bool) -> str | None:
    """Every rank takes the projections step ``step`` trains with; with ``check``, the ranks then
    prove they agree (an all-gather of digests) and the digest is returned."""
    model.set_projections_for_step_(seed, step, redraws)
    if not check:
        return None
    digest = projection_digest(model)
    digests = gather_objects(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"FAVOR+ projections differ between ranks for step {step}: {digests}")
    return digest


def projection_record(model, redraws: RedrawSchedule, step: int) -> dict | None:
    """The projection in force after ``step`` optimizer steps, for checkpoints and exports
    (``RedrawSchedule.record``); None without FAVOR attention."""
    state = model.projection_state()
    return None if state is None else redraws.record(step, base_seed=state[0])
