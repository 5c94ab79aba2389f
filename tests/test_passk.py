"""pass@k against independent computations: subset enumeration and the binomial closed form."""

from __future__ import annotations

import itertools
import math

import pytest

from ebft.evaluation.passk import mean_pass_at_k, pass_at_k


def fraction_of_subsets_with_a_correct_sample(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(fraction_of_subsets_with_a_correct_sample(n, c, k), abs=1e-12)


@pytest.mark.parametrize(
    "n,c,k", [(200, 13, 1), (200, 13, 10), (200, 13, 100), (1000, 1, 500), (50, 0, 7), (50, 50, 7)]
)
def test_matches_binomial_closed_form_for_large_n(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, then one division
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_not_best_of_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # best-of-n would say 1.0 for any c > 0; the unbiased estimate of pass@5 with 1/10 correct is 0.5.
    assert pass_at_k(10, 1, 5) == pytest.approx(0.5)


@pytest.mark.parametrize("n,c,k", [(5, 2, 6), (5, 2, 0), (5, 6, 1), (5, -1, 1)])
def test_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_over_problems_and_k_beyond_some_problems_sample_count_is_left_out():
    counts = [(4, 1), (4, 0), (6, 6)]
    report = mean_pass_at_k(counts, k_values=(1, 2, 5))
    assert set(report) == {"pass@1", "pass@2"}
    expected_pass2 = ((1 - math.comb(3, 2) / math.comb(4, 2)) + 0.0 + 1.0) / 3
    assert report["pass@1"] == pytest.approx((1 / 4 + 0 + 1) / 3)
    assert report["pass@2"] == pytest.approx(expected_pass2)
    assert mean_pass_at_k([], (1,)) == {}
