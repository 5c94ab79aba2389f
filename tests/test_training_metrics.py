"""The reward metrics a training step logs (train/gt_reward, train/diversity_reward, train/reward, train/cfm) against
the formulas of docs/method.md computed one (document, block) group at a time in float64, with plain loops."""

from __future__ import annotations

import pytest
import torch
from learner_reference import make_batch, make_config

from ebft.learner.engine import LearnerRank


def loop_metrics(
    rollout_features: torch.Tensor, gt_features: torch.Tensor, alignment_coef: float, diversity_coef: float
):
    """Means over every (document, block, sample) of the un-whitened alignment 2 cos(phi_j, phi_y), the diversity
    2/(n-1) sum_{j' != j} <phi_j, phi_j'> and the reward; and over every (document, block) of the unbiased CFM
    estimate mean_{j != j'} <phi_j, phi_j'> - 2 mean_j <phi_j, phi_y> + |phi_y|^2."""
    docs, blocks, n, _ = rollout_features.shape
    alignments, diversities, rewards, cfms = [], [], [], []
    for i in range(docs):
        for k in range(blocks):
            X, y = rollout_features[i, k].double(), gt_features[i, k].double()
            pairs = [(j, m) for j in range(n) for m in range(n) if j != m]
            for j in range(n):
                alignment = 2 * torch.dot(X[j], y) / (X[j].norm() * y.norm())
                diversity = 2 / (n - 1) * sum(torch.dot(X[j], X[m]) for m in range(n) if m != j)
                alignments.append(float(alignment))
                diversities.append(float(diversity))
                rewards.append(float(alignment_coef * alignment - diversity_coef * diversity))
            cross = sum(float(torch.dot(X[j], X[m])) for j, m in pairs) / len(pairs)
            cfms.append(cross - 2 * sum(float(torch.dot(X[j], y)) for j in range(n)) / n + float(torch.dot(y, y)))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"gt_reward": mean(alignments), "diversity_reward": mean(diversities), "reward": mean(rewards)}, mean(cfms)


def test_logged_reward_metrics_equal_the_formulas_computed_group_by_group(tiny_model_dir):
    config = make_config(reward={"whitening": "none", "diversity_coef": 0.5, "alignment_coef": 1.0})
    learner = LearnerRank(config, tiny_model_dir)
    try:
        for version in range(2):
            rollouts, features = make_batch(4, seed=7 + version, version=version)
            metrics = learner.train_step([rollouts], [features], current_version=version)
            expected, cfm = loop_metrics(features.rollout_features, features.gt_features, 1.0, 0.5)
            for name, value in expected.items():
                assert metrics[f"train/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
            assert metrics["train/cfm"] == pytest.approx(cfm, rel=1e-5, abs=1e-6)
    finally:
        learner.close()
