"""The feature-matching estimators and the paired bootstrap, against plain loops and known distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebft.evaluation.stats import paired_difference
from ebft.objective import cfm_plugin, cfm_unbiased


def test_unbiased_cfm_equals_a_float64_loop():
    generator = torch.Generator().manual_seed(0)
    docs, n, NB, D = 3, 5, 4, 7
    x = torch.randn(docs, NB, n, D, generator=generator)
    y = torch.randn(docs, NB, D, generator=generator)
    got = cfm_unbiased(x, y)
    assert got.dtype == torch.float64 and got.shape == (docs, NB)
    for d in range(docs):
        for k in range(NB):
            phis = [[float(v) for v in x[d, k, j]] for j in range(n)]
            phi_y = [float(v) for v in y[d, k]]
            dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
            pairs = sum(dot(phis[a], phis[b]) for a in range(n) for b in range(n) if a != b) / (n * (n - 1))
            alignment = sum(dot(p, phi_y) for p in phis) / n
            assert float(got[d, k]) == pytest.approx(pairs - 2 * alignment + dot(phi_y, phi_y), rel=1e-12, abs=1e-12)
            mean = [sum(p[i] for p in phis) / n for i in range(D)]
            assert float(cfm_plugin(x, y)[d, k]) == pytest.approx(
                sum((m - t) ** 2 for m, t in zip(mean, phi_y)), rel=1e-12
            )


def test_unbiased_cfm_has_the_objective_as_expectation_and_the_plugin_is_biased_by_trace_cov_over_n():
    # phi_j ~ N(mu, sigma^2 I) around a fixed target y: the objective is |mu - y|^2, tr(Cov) = D sigma^2.
    generator = torch.Generator().manual_seed(1)
    groups, n, D, sigma = 20_000, 4, 6, 0.5
    mu, y = torch.full((D,), 0.3), torch.zeros(D)
    x = mu + sigma * torch.randn(groups, 1, n, D, generator=generator, dtype=torch.float64)
    target = y.expand(groups, 1, D)
    objective = float((mu - y).square().sum())
    unbiased, plugin = cfm_unbiased(x, target).flatten(), cfm_plugin(x, target).flatten()
    stderr = lambda v: float(v.std() / groups**0.5)  # noqa: E731
    assert abs(float(unbiased.mean()) - objective) < 4 * stderr(unbiased)
    bias = D * sigma**2 / n
    assert abs(float(plugin.mean()) - objective - bias) < 4 * stderr(plugin)
    assert bias > 20 * stderr(plugin)  # the test would notice the plug-in's bias in the unbiased estimate
    with pytest.raises(ValueError, match="n >= 2"):
        cfm_unbiased(x[:, :, :1], target)


def test_paired_bootstrap_interval_covers_a_known_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    delta, units, trials, covered = -0.2, 40, 300, 0
    for trial in range(trials):
        before = rng.normal(2.0, 1.0, units)  # large between-unit spread that pairing removes
        after = before + delta + rng.normal(0.0, 0.3, units)
        difference = paired_difference(after, before, resamples=2000, seed=trial)
        covered += difference.low <= delta <= difference.high
    assert 0.90 <= covered / trials <= 0.99
    assert difference.significant and difference.mean == pytest.approx(float((after - before).mean()))


def test_bootstrap_over_source_files_is_wider_when_chunks_of_a_file_move_together():
    rng = np.random.default_rng(1)
    files, per_file = 10, 6
    groups = np.repeat(np.arange(files), per_file)
    shift = rng.normal(0.0, 1.0, files)[groups]  # chunks of one file share their change
    before = rng.normal(0.0, 1.0, files * per_file)
    after = before + shift + rng.normal(0.0, 0.05, files * per_file)
    clustered = paired_difference(after, before, groups)
    naive = paired_difference(after, before)
    assert clustered.high - clustered.low > 1.8 * (naive.high - naive.low)
    with pytest.raises(ValueError, match="paired values"):
        paired_difference([1.0, 2.0], [1.0])
