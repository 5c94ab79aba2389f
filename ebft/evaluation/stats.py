"""Paired bootstrap intervals for the difference of two evaluations on the same held-out chunks.

Chunks cut from one source file are correlated, so the resampled unit is the file (a cluster
bootstrap): each replicate draws files with replacement and averages the per-chunk differences of
the chunks it drew. With one chunk per file this is the ordinary paired bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000


@dataclass(frozen=True)
class Difference:
    mean: float
    low: float
    high: float
    """The 95% percentile interval of the mean difference."""

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_difference(
    after: Sequence[float],
    before: Sequence[float],
    groups: Sequence[int] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Difference:
    """Mean of after - before over paired units, with a 95% bootstrap interval resampling `groups`
    (one label per unit, e.g. the source file of each chunk; None: every unit is its own group)."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length, non-empty sequences of paired values (got {a.shape} and {b.shape})")
    labels = np.arange(a.size) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    if labels.shape != a.shape:
        raise ValueError(f"{labels.size} group labels for {a.size} paired values")
    num_groups = int(labels.max()) + 1
    group_sums = np.bincount(labels, weights=a - b, minlength=num_groups)
    group_sizes = np.bincount(labels, minlength=num_groups).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, num_groups, size=(resamples, num_groups))
    counts = np.stack([np.bincount(row, minlength=num_groups) for row in draws])  # [resamples, groups]
    means = (counts @ group_sums) / (counts @ group_sizes)
    low, high = np.quantile(means, [0.025, 0.975])
    return Difference(float((a - b).mean()), float(low), float(high))
