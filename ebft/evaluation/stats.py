"""Paired bootstrap intervals for the difference of two evaluations on the same held-out chunks.

Chunks cut from one source file are correlated, so the resampled unit is the file (a cluster
bootstrap): each replicate draws files with replacement and averages the per-chunk differences of
the chunks it drew. With one chunk per file this is the ordinary paired bootstrap.

With several training seeds (`ebft compare`'s compare.seeds) every seed gives its own per-chunk differences on the
same chunks, and a seed's effect is shared by all of them. `seeded_paired_difference` resamples both: each replicate
draws the seeds with replacement and, independently, the files, and averages the differences of every drawn
(seed, chunk) pair (docs/method.md section 8).
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
    counts = _draw_counts(np.random.default_rng(seed), num_groups, resamples)  # [resamples, groups]
    means = (counts @ group_sums) / (counts @ group_sizes)
    low, high = np.quantile(means, [0.025, 0.975])
    return Difference(float((a - b).mean()), float(low), float(high))


def seeded_paired_difference(
    after: Sequence[Sequence[float]],
    before: Sequence[Sequence[float]],
    groups: Sequence[int] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Difference:
    """Mean of after - before over seeds and paired units (after[s][i] against before[s][i]: seed s, unit i), with a
    95% interval from a bootstrap that resamples the seeds and, independently, the `groups` of units. With one seed
    it is `paired_difference`."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"need two equal [seeds, units] arrays of paired values (got {a.shape} and {b.shape})")
    if a.shape[0] == 1:
        return paired_difference(a[0], b[0], groups, resamples=resamples, seed=seed)
    num_seeds, units = a.shape
    labels = np.arange(units) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    if labels.shape != (units,):
        raise ValueError(f"{labels.size} group labels for {units} paired values")
    num_groups = int(labels.max()) + 1
    # [seeds, groups]: each seed's sum of differences over each group's units
    sums = np.stack([np.bincount(labels, weights=row, minlength=num_groups) for row in a - b])
    sizes = np.bincount(labels, minlength=num_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    seed_counts = _draw_counts(rng, num_seeds, resamples)  # [resamples, seeds]
    group_counts = _draw_counts(rng, num_groups, resamples)  # [resamples, groups]
    totals = np.einsum("rs,sg,rg->r", seed_counts, sums, group_counts)
    means = totals / (seed_counts.sum(1) * (group_counts @ sizes))
    low, high = np.quantile(means, [0.025, 0.975])
    return Difference(float((a - b).mean()), float(low), float(high))


def _draw_counts(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """How often each of `size` items is drawn in each replicate of `size` draws with replacement."""
    draws = rng.integers(0, size, size=(resamples, size))
    return np.stack([np.bincount(row, minlength=size) for row in draws]).astype(np.float64)
