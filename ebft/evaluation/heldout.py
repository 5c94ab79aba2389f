"""Held-out metrics on packed chunks: cross-entropy, feature-matching loss, alignment reward pass@1/k.

The evaluator is given three functions, so the same code runs against Ray actors during training
and against in-process engines in `ebft eval`:
    generate(ChunkBatch) -> RolloutBatch     the current policy's rollouts (the training geometry)
    embed(RolloutBatch) -> FeatureBatch      the frozen feature network
    document_ce(tokens [docs, T]) -> [docs]  teacher-forced token-mean NLL under the current policy
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ebft.config import Config
from ebft.learner.rewards import compute_rewards
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch

# Sampling seeds of held-out rollouts come from this step number, far from any training step.
EVAL_SEED_STEP = 1 << 30


def feature_matching_loss(features: FeatureBatch) -> torch.Tensor:
    """||mean_j phi_j - phi_y||^2 per (document, block): [docs, NB]; the calibration metric."""
    mean_rollout = features.rollout_features.double().mean(dim=1)  # [docs, NB, D]
    return (mean_rollout - features.gt_features.double()).square().sum(-1)


def feature_metrics(config: Config, features: FeatureBatch) -> dict[str, float]:
    groups = features.rollout_features.transpose(1, 2)  # [docs, NB, n, D]
    alignment = compute_rewards(
        groups,
        features.gt_features,
        alignment_coef=config.reward.alignment_coef,
        diversity_coef=config.reward.diversity_coef,
        whitening=config.reward.whitening,
        tol=config.reward.tol,
    ).alignment
    return {
        "eval/feature_matching_loss": feature_matching_loss(features).mean().item(),
        "eval/reward_pass1_gt": alignment.mean().item(),
        "eval/reward_passk_gt": alignment.max(dim=-1).values.mean().item(),
    }


class HeldoutEvaluator:
    def __init__(self, config: Config, heldout: ChunkBatch | None):
        self.config = config
        self.chunks = None if heldout is None else ChunkBatch(heldout.chunk_ids, heldout.tokens, EVAL_SEED_STEP)

    @property
    def enabled(self) -> bool:
        return self.chunks is not None and self.config.eval.every > 0

    def run(
        self,
        generate: Callable[[ChunkBatch], RolloutBatch],
        embed: Callable[[RolloutBatch], FeatureBatch],
        document_ce: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, float]:
        if self.chunks is None:
            return {}
        ce = document_ce(self.chunks.tokens).double().mean().item()
        metrics = {"eval/full_ce_loss": ce, "eval/full_perplexity": math.exp(ce)}
        metrics.update(feature_metrics(self.config, embed(generate(self.chunks))))
        return metrics
