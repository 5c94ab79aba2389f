"""EBFT rewards: whitened feature alignment and diversity, with the exact leave-one-out baseline.

For every group (document, block) with rollout features X [n, D] and ground-truth feature y [D]:

    alignment_j = 2 cos(x_j, y)
    diversity_j = 2/(n-1) * sum_{j' != j} <x_j, x_j'>
    r_j         = a * alignment_j - d * diversity_j
    b_j         = a * mean_{j' != j} alignment_j' - d * (sum_j' diversity_j' - 2 diversity_j) / (n - 2)
    A_j         = r_j - b_j

with x and y whitened first (docs/method.md section 4). Every quantity only needs inner products,
so the whole computation runs on X X^T, X y and |y|^2: batched products read the features once,
and whitening is an eigendecomposition of the n x n matrix X X^T.

With G = X X^T = U diag(lam) U^T (kept eigenvalues only) and P = U U^T the projector onto the
span of the rollouts:
- "sample" (authors' code): W = G^{+1/2} over the sample axis. Whitened rollouts W X have Gram P;
  the ground truth is W applied to n stacked copies of y, so row j is c_j y with c = W 1, and
  <(WX)_j, c_j y> = c_j (W X y)_j.
- "feature" (paper text): x and y mapped by (Sigma^+)^{1/2}, Sigma = X^T X / n. Whitened rollouts
  have Gram n P; <x_j, y> becomes n (G^+ X y)_j and |y|^2 becomes n |diag(lam^-1) U^T X y|^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ebft.config import RewardConfig

Whitening = Literal["none", "sample", "feature"]
_EPS = 1e-12


@dataclass
class Rewards:
    alignment: torch.Tensor  # [..., n]
    diversity: torch.Tensor  # [..., n]
    rewards: torch.Tensor  # [..., n]
    advantages: torch.Tensor  # [..., n]


def _matvec(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (A @ v.unsqueeze(-1)).squeeze(-1)


def _whitened_products(X: torch.Tensor, y: torch.Tensor, whitening: Whitening, tol: float):
    """After whitening: (sum_{j' != j} <x_j, x_j'>, <x_j, y_j>, |x_j|^2, |y_j|^2), each [..., n] float64.

    y_j is the ground truth as seen by sample j (the "sample" variant rescales it per row).
    """
    n = X.shape[-2]
    Xt = X.transpose(-1, -2)
    # These products read the features; everything after works on n x n matrices.
    G = (X @ Xt).double()
    Xy = (y.unsqueeze(-2) @ Xt).squeeze(-2).double()  # faster than X @ y[..., None] on CPU
    yy = torch.linalg.vector_norm(y, dim=-1).double().square().unsqueeze(-1).expand_as(Xy)
    if whitening == "none":
        diag = G.diagonal(dim1=-2, dim2=-1)
        return G.sum(-1) - diag, Xy, diag, yy
    if whitening not in ("sample", "feature"):
        raise ValueError(f"whitening must be one of 'none', 'sample', 'feature' (got {whitening!r})")

    lam, U = torch.linalg.eigh((G + G.transpose(-1, -2)) / 2)
    # Singular values of X are sqrt(lam): drop those below tol * the largest. The Gram is float32,
    # so eigenvalues under ~n * eps32 of the largest are rounding noise and are dropped as well.
    rel = max(tol * tol, n * torch.finfo(X.dtype).eps)
    keep = lam > rel * lam[..., -1:].clamp_min(_EPS)
    inv_sqrt = torch.where(keep, lam.clamp_min(_EPS).rsqrt(), 0.0)
    U_kept = U * keep.unsqueeze(-2)
    Ut = U.transpose(-1, -2)
    ones = torch.ones_like(lam)
    # Whitened rollouts have Gram P = U_kept U_kept^T ("sample") or n P ("feature").
    P_diag = U_kept.square().sum(-1)
    P_offdiag_sum = _matvec(U_kept, _matvec(U_kept.transpose(-1, -2), ones)) - P_diag
    UtXy = _matvec(Ut, Xy)
    if whitening == "sample":
        c = _matvec(U, inv_sqrt * _matvec(Ut, ones))  # W 1: row j of W [y; ...; y] is c_j y
        WXy = _matvec(U, inv_sqrt * UtXy)
        return P_offdiag_sum, c * WXy, P_diag, c * c * yy
    inv = inv_sqrt.square()
    y_norm2 = n * (inv * UtXy).square().sum(-1, keepdim=True).expand_as(Xy)
    return n * P_offdiag_sum, n * _matvec(U, inv * UtXy), n * P_diag, y_norm2


def compute_rewards(rollout_features: torch.Tensor, gt_features: torch.Tensor, reward: RewardConfig) -> Rewards:
    """Rewards and advantages for rollout_features [..., n, D] against gt_features [..., D], with the run's
    `reward` settings (coefficients a and d, whitening, tol).

    Batched over all leading dimensions. Returns float32 tensors [..., n]. Degenerate groups
    (identical rollouts, zero features) give finite values.
    """
    # Contiguous: both products below read X, and on a transposed view they ran ~2.7x slower than one copy plus the
    # products (benchmarks/rewards.py). Feature workers return [docs, NB, n, D], already contiguous: no copy then.
    X = rollout_features.float().contiguous()
    y = gt_features.float().contiguous()
    if X.shape[:-2] != y.shape[:-1] or X.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"rollout_features {tuple(X.shape)} [..., n, D] and gt_features {tuple(y.shape)} [..., D] disagree"
        )
    n = X.shape[-2]
    if n < 2:
        raise ValueError(f"need n >= 2 rollouts per group for a leave-one-out baseline (got n={n})")

    offdiag_sum, xy, xx, yy = _whitened_products(X, y, reward.whitening, reward.tol)
    alignment = 2 * xy / (xx.clamp_min(0).sqrt() * yy.clamp_min(0).sqrt()).clamp_min(_EPS)
    diversity = 2 / (n - 1) * offdiag_sum

    a, d = reward.alignment_coef, reward.diversity_coef
    rewards = a * alignment - d * diversity
    baseline = a * (alignment.sum(-1, keepdim=True) - alignment) / (n - 1)
    if n > 2:
        baseline = baseline - d * (diversity.sum(-1, keepdim=True) - 2 * diversity) / (n - 2)
    advantages = rewards - baseline
    return Rewards(*(t.float() for t in (alignment, diversity, rewards, advantages)))
