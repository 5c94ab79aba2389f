"""RLVR advantages against a plain-loop float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from ebft.rlvr.advantages import leave_one_out_advantages

REWARDS = [
    [1.0, 0.0, 0.0, 1.0],
    [0.25, 0.5, 1.0, 0.75],
    [1.0, 1.0, 1.0, 1.0],  # all passed: no signal
    [0.0, 0.0, 0.0, 1.0],
    [0.1, 0.1, 0.1, 0.1],  # equal, and 0.1 is not exact in binary
]


def by_loops(rewards: list[list[float]], divide_by_std: bool, eps: float):
    out, equal = [], 0
    for group in rewards:
        n = len(group)
        if all(r == group[0] for r in group):
            out.append([0.0] * n)
            equal += 1
            continue
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        row = []
        for j in range(n):
            baseline = sum(group[k] for k in range(n) if k != j) / (n - 1)
            a = group[j] - baseline
            row.append(a / (std + eps) if divide_by_std else a)
        out.append(row)
    return out, equal


@pytest.mark.parametrize("divide_by_std", [False, True])
def test_leave_one_out_against_loops(divide_by_std):
    result = leave_one_out_advantages(torch.tensor(REWARDS, dtype=torch.float64), divide_by_std, eps=1e-6)
    expected, equal = by_loops(REWARDS, divide_by_std, eps=1e-6)
    torch.testing.assert_close(result.advantages, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert result.equal_groups == equal == 2
    assert (result.advantages[[2, 4]] == 0).all()  # exactly zero, not rounding noise


def test_float32_rewards_keep_their_dtype():
    result = leave_one_out_advantages(torch.tensor(REWARDS, dtype=torch.float32))
    assert result.advantages.dtype == torch.float32
    expected, _ = by_loops([[float(torch.tensor(r, dtype=torch.float32)) for r in g] for g in REWARDS], False, 1e-6)
    torch.testing.assert_close(
        result.advantages.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0
    )


def test_a_group_needs_two_completions():
    with pytest.raises(ValueError):
        leave_one_out_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError):
        leave_one_out_advantages(torch.ones(4))
