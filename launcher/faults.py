"""Fault injection for reliability tests, off unless PERFORMER_FAULTS is set.

    PERFORMER_FAULTS="nonfinite_loss@3,4,5"   the loss of forward attempts 3, 4 and 5 (counted
                                              from 1 in this process, on every rank) becomes NaN

The trainer's handling is then exercised through its real path (detection on every rank, skip,
count, stop after train.max_consecutive_nonfinite), not through a mock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

ENVIRONMENT_VARIABLE = "PERFORMER_FAULTS"


@dataclass(frozen=True)
class Faults:
    nonfinite_loss_attempts: frozenset[int] = field(default_factory=frozenset)
    "Forward attempts (1-based, per process) whose loss is replaced by NaN."

    @classmethod
    def from_environment(cls, environ=None) -> "Faults":
        spec = (os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE, "").strip()
        attempts: set[int] = set()
        for item in filter(None, (part.strip() for part in spec.split(";"))):
            name, _, where = item.partition("@")
            if name != "nonfinite_loss" or not where:
                raise ValueError(f"{ENVIRONMENT_VARIABLE}: unknown fault {item!r}; known: nonfinite_loss@N[,N...]")
            attempts.update(int(n) for n in where.split(","))
        return cls(nonfinite_loss_attempts=frozenset(attempts))

    def corrupt_loss(self, loss: torch.Tensor, attempt: int) -> torch.Tensor:
        return loss * float("nan") if attempt in self.nonfinite_loss_attempts else loss
