"""Mixtures: which source fills each row, as a pure function of the row index, in stages by step.

Rows are packed per source and every row is full, so a source's share of rows is its share of
tokens. Within a stage the choice follows a fixed pattern of `PERIOD` rows in which source s gets
round(w_s * PERIOD) rows, spread evenly (smooth weighted round robin, like Grain's own
proportional mixing, which has no stages). Over any n rows of a stage each share is within
(S + 1) / n of its weight, S sources (~0.1 percentage point over 2,000 rows): the realized mixture
is the configured one, not a random draw from it.

A stage starts at the first row of its first step (steps count from 1, batch k is step k + 1); the
pattern restarts there.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

PERIOD = 1000  # weight resolution 0.1%


def _quotas(weights: tuple[float, ...]) -> np.ndarray:
    """Integer rows per period for each source (largest remainder, summing to PERIOD)."""
    exact = np.asarray(weights, dtype=np.float64) * PERIOD / sum(weights)
    quotas = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - quotas), kind="stable")[:PERIOD - quotas.sum()]:
        quotas[i] += 1
    return quotas


def _pattern(weights: tuple[float, ...]) -> np.ndarray:
    """Source per row of one period, each source spread evenly (smooth weighted round robin)."""
    quotas = _quotas(weights)
    current = np.zeros(len(quotas), dtype=np.int64)
    pattern = np.empty(PERIOD, dtype=np.int32)
    for i in range(PERIOD):
        current += quotas
        chosen = int(np.argmax(current))
        current[chosen] -= PERIOD
        pattern[i] = chosen
    return pattern


class StagedSelectionMap:
    """Row index (within one process's stream) -> source index, with weights changing by step.

    `stages` is [(first step, weights)], the first starting at step 1; `rows_per_step` is the
    number of rows this process contributes to each step's batch: one number, or one per stage
    (stages may change the batch size). A pure function of the row, so a resumed run needs only
    the step.
    """

    def __init__(self, stages: list[tuple[int, tuple[float, ...]]], rows_per_step: int | Sequence[int]):
        rows = [rows_per_step] * len(stages) if isinstance(rows_per_step, int) else list(rows_per_step)
        self._steps = [first_step for first_step, _ in stages]
        self._rows = rows
        self._starts = [0]  # each stage's first row: the rows of the stages before it
        for k in range(1, len(stages)):
            self._starts.append(self._starts[-1] + (self._steps[k] - self._steps[k - 1]) * rows[k - 1])
        self._patterns = [_pattern(weights) for _, weights in stages]

    def first_row(self, step: int) -> int:
        """The index of step `step`'s first row (steps count from 1)."""
        stage = bisect.bisect_right(self._steps, step) - 1
        return self._starts[stage] + (step - self._steps[stage]) * self._rows[stage]

    def source_of(self, row: int) -> int:
        stage = bisect.bisect_right(self._starts, row) - 1
        return int(self._patterns[stage][(row - self._starts[stage]) % PERIOD])

    def sources_of(self, first_row: int, count: int) -> np.ndarray:
        return np.array([self.source_of(first_row + i) for i in range(count)], dtype=np.int32)
