"""Leave-one-out advantages over the n completions of each prompt (docs/method.md, RLVR).

    A_j = r_j - mean_{k != j} r_k = n / (n - 1) * (r_j - mean_k r_k)

optionally divided by the group's standard deviation (n - 1 in the denominator) + eps. A group whose
n rewards are all equal (every completion passed, or none did) has no signal: its advantages are
exactly 0 and it is counted, so a run can log how much of each step taught nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: torch.Tensor  # [prompts, n], the rewards' dtype
    equal_groups: int  # prompts whose n rewards are all equal


def leave_one_out_advantages(rewards: torch.Tensor, divide_by_std: bool = False, eps: float = 1e-6) -> GroupAdvantages:
    """rewards [prompts, n] (n >= 2) -> advantages [prompts, n], computed in float64."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, n >= 2], got {tuple(rewards.shape)}")
    r = rewards.double()
    n = r.shape[1]
    advantages = r - (r.sum(-1, keepdim=True) - r) / (n - 1)
    if divide_by_std:
        advantages = advantages / (r.std(-1, keepdim=True) + eps)
    equal = (r == r[:, :1]).all(-1)
    advantages = torch.where(equal[:, None], torch.zeros_like(advantages), advantages)
    return GroupAdvantages(advantages.to(rewards.dtype), int(equal.sum()))
