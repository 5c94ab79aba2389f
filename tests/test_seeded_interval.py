"""The interval of a paired difference over several training seeds and the held-out chunks (compare.seeds)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ebft.evaluation.stats import paired_difference, seeded_paired_difference


def exact_quantile(values: list[float], weights: list[float], q: float) -> float:
    """The smallest value whose cumulative weight reaches q (the inverse CDF of a discrete distribution)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    total, cumulative = sum(weights), 0.0
    for i in order:
        cumulative += weights[i]
        if cumulative >= q * total - 1e-12:
            return values[i]
    return values[order[-1]]


def test_seeded_interval_matches_the_exact_two_way_bootstrap_of_fixed_numbers():
    # 2 seeds x 4 chunks from 3 files (file 1 holds two chunks); seed 1 moved every chunk up by about 0.5.
    after = [[0.30, 0.10, 0.20, -0.10], [0.90, 0.55, 0.70, 0.35]]
    before = [[0.10, 0.05, 0.00, 0.00], [0.10, 0.05, 0.00, 0.00]]
    groups = [7, 3, 3, 9]
    files = {7: [0], 3: [1, 2], 9: [3]}
    diff = [[a - b for a, b in zip(row_a, row_b)] for row_a, row_b in zip(after, before)]

    # Every replicate by hand: 2^2 ordered draws of seeds times 3^3 of files, all equally likely.
    values = []
    for seeds in itertools.product(range(2), repeat=2):
        for drawn in itertools.product(list(files), repeat=3):
            cells = [diff[s][i] for s in seeds for f in drawn for i in files[f]]
            values.append(sum(cells) / len(cells))
    weights = [1.0] * len(values)

    got = seeded_paired_difference(after, before, groups, resamples=20_000, seed=3)
    assert got.mean == pytest.approx(sum(map(sum, diff)) / 8, rel=1e-12)
    # 20,000 replicates put the 2.5% and 97.5% points within a few tenths of a percent of the exact ones.
    assert exact_quantile(values, weights, 0.015) <= got.low <= exact_quantile(values, weights, 0.035)
    assert exact_quantile(values, weights, 0.965) <= got.high <= exact_quantile(values, weights, 0.985)


def test_a_seed_effect_shared_by_every_chunk_widens_the_interval_and_one_seed_is_the_file_bootstrap():
    rng = np.random.default_rng(0)
    seeds, chunks = 4, 40
    before = rng.normal(0.0, 1.0, chunks)
    # Each seed shifts every chunk alike (sd 0.3); chunks differ by little within a seed (sd 0.05).
    after = [before + 0.1 + rng.normal(0.0, 0.3) + rng.normal(0.0, 0.05, chunks) for _ in range(seeds)]
    befores = [before] * seeds
    seeded = seeded_paired_difference(after, befores)
    # Averaging over seeds first and resampling chunks only ignores that the seeds disagree.
    chunks_only = paired_difference(np.mean(after, axis=0), before)
    assert seeded.mean == pytest.approx(chunks_only.mean, rel=1e-12)
    assert seeded.high - seeded.low > 5 * (chunks_only.high - chunks_only.low)

    one = seeded_paired_difference(after[:1], befores[:1], seed=5)
    assert one == paired_difference(after[0], before, seed=5)
    with pytest.raises(ValueError, match="seeds, units"):
        seeded_paired_difference([[1.0, 2.0]], [[1.0]])
