"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples for a problem of which c are correct, the probability that a random subset of
k samples (drawn without replacement) contains at least one correct one is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form avoids the huge binomials. This is NOT "best of n" (which is pass@n).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem from n samples with c correct."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= num_correct <= num_samples, got c={num_correct}, n={num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"need 1 <= k <= num_samples, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0  # every subset of size k contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k_values: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over problems, given (num_samples, num_correct) per problem.

    Returns {"pass@k": value}. A k larger than some problem's sample count is left out (that
    problem has no unbiased estimate), as in the reference implementation."""
    counts = list(counts)
    if not counts:
        return {}
    report = {}
    for k in k_values:
        if all(n >= k for n, _ in counts):
            report[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return report
