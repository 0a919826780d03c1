"""Weighted mixtures of prepared splits: which source each row of the blended stream comes from.

The blended stream is cut into periods of PERIOD rows. Each source gets a quota of every period,
its weight's share rounded by largest remainder (so the quotas sum to PERIOD and no source with
a positive weight gets none), and the period's rows are dealt to the sources in a random order
seeded by (seed, period). Row k of the blend is therefore a pure function of (weights, seed, k):
the k-th row's source and its place in that source's own row stream (rows 0, 1, 2, ... of the
source's epoch 0, then of its epoch 1, ...) are computed without looking at any other row, which
is what makes a blend resume exactly at any world size, and what lets the tokens drawn from each
source be counted from the stream's cursor alone. Over any whole number of periods the shares are
exact (to 1/PERIOD of the weights); inside a period they are within one period's rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Sequence

import numpy as np

from data.errors import DataError

PERIOD = 4096
_MIX_KEY = 0x313C


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One split of a mixture (`data.sources`)."""

    manifest: str
    "A prepared split: its manifest.json or the directory that holds it."
    weight: float = 1.0
    "Share of the mixture's rows: this weight over the sum of the weights (> 0)."
    name: str | None = None
    "Name in reports and metrics (data_tokens_<name>); default: the directory holding the split."

    def __post_init__(self) -> None:
        # One check for every way a source is given (run config, StreamConfig, code).
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise DataError(
                f"source {self.manifest} has weight {weight!r}; weights must be positive numbers (a source's share "
                "of the rows is its weight over their sum); leave a source out to stop training on it"
            )


def quotas(weights: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """int64 (S,): rows of each source per period; they sum to ``period``, each at least 1."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) == 0 or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise DataError(f"mixture weights must be positive numbers, got {list(weights)}")
    if len(weights) > period:
        raise DataError(f"a mixture of {len(weights)} sources is more than the {period} rows of a period")
    exact = weights / weights.sum() * period
    quota = np.maximum(np.floor(exact).astype(np.int64), 1)
    # Largest remainder, deterministic ties (lowest index first); taking back from the largest
    # quotas if the minimum of one row pushed the sum over.
    while quota.sum() < period:
        quota[int(np.argmax(exact - quota))] += 1
    while quota.sum() > period:
        quota[int(np.argmax(np.where(quota > 1, quota - exact, -np.inf)))] -= 1
    return quota


class Mixture:
    """Row k of a blend -> (source, row of that source); see the module docstring."""

    def __init__(self, weights: Sequence[float], seed: int, period: int = PERIOD):
        self.quotas = quotas(weights, period)
        self.period, self.seed = period, seed
        self._periods: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _dealt(self, period: int) -> tuple[np.ndarray, np.ndarray]:
        """Period ``period``'s rows: the source of each, and how many rows of that source came
        before it in the period."""
        cached = self._periods.get(period)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, period, _MIX_KEY])
        source = rng.permutation(np.repeat(np.arange(len(self.quotas)), self.quotas))
        before = np.empty(self.period, dtype=np.int64)
        for s, quota in enumerate(self.quotas):
            before[source == s] = np.arange(quota)
        self._periods[period] = (source, before)
        while len(self._periods) > 4:
            self._periods.popitem(last=False)
        return source, before

    def assign(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [first, first + count) of the blend: int64 (count,) sources and int64 (count,) rows
        within each source's stream."""
        rows = np.arange(first, first + count, dtype=np.int64)
        periods, within = np.divmod(rows, self.period)
        source = np.empty(count, dtype=np.int64)
        row = np.empty(count, dtype=np.int64)
        for period in np.unique(periods):
            here = periods == period
            dealt, before = self._dealt(int(period))
            source[here] = dealt[within[here]]
            row[here] = int(period) * self.quotas[source[here]] + before[within[here]]
        return source, row

    def counts(self, rows: int) -> np.ndarray:
        """int64 (S,): rows each source gave to the first ``rows`` rows of the blend."""
        periods, within = divmod(rows, self.period)
        counts = periods * self.quotas
        if within:
            counts = counts + np.bincount(self._dealt(periods)[0][:within], minlength=len(self.quotas))
        return counts.astype(np.int64)
