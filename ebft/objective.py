"""Estimates of the conditional feature-matching objective from pooled features (docs/method.md section 8).

For one (document, block) with rollout features phi_1..phi_n and ground-truth feature phi_y, the
objective is ||E phi - phi_y||^2. Two estimates, each per (document, block):

    unbiased:  mean_{j != j'} <phi_j, phi_j'> - 2 mean_j <phi_j, phi_y> + |phi_y|^2
    plug-in:   ||mean_j phi_j - phi_y||^2  =  unbiased + (mean_j |phi_j|^2 - mean_{j != j'} <phi_j, phi_j'>) / n

The plug-in estimate is biased up by tr(Cov)/n in expectation, so it rises when the samples become
more diverse even if the mean feature did not move; the unbiased one does not.
"""

from __future__ import annotations

import torch


def cfm_unbiased(rollout_features: torch.Tensor, gt_features: torch.Tensor) -> torch.Tensor:
    """rollout_features [docs, NB, n, D], gt_features [docs, NB, D] -> [docs, NB] float64 (n >= 2)."""
    x = rollout_features.double()
    y = gt_features.double()
    n = x.shape[-2]
    if n < 2:
        raise ValueError(f"the unbiased estimate needs n >= 2 samples per block, got {n}")
    total = x.sum(dim=-2)  # [docs, NB, D]
    squared_norms = x.square().sum(-1).sum(-1)  # sum_j |phi_j|^2, [docs, NB]
    cross = (total.square().sum(-1) - squared_norms) / (n * (n - 1))  # mean over ordered pairs j != j'
    alignment = (total * y).sum(-1) / n
    return cross - 2 * alignment + y.square().sum(-1)


def cfm_plugin(rollout_features: torch.Tensor, gt_features: torch.Tensor) -> torch.Tensor:
    """||mean_j phi_j - phi_y||^2: [docs, NB] float64."""
    return (rollout_features.double().mean(dim=-2) - gt_features.double()).square().sum(-1)
