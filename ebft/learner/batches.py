"""A step's documents: slicing rollout/feature batches across ranks, advantages, staleness."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebft.config import Config
from ebft.layout import BlockPlan
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch
from ebft.objective import cfm_unbiased
from ebft.rewards import compute_rewards


def slice_batches(
    rollouts: list[RolloutBatch], features: list[FeatureBatch], start: int, stop: int
) -> tuple[list[RolloutBatch], list[FeatureBatch]]:
    """Documents start..stop of the concatenation of the batches, keeping each batch's weight version."""
    out_r, out_f, offset = [], [], 0
    for r, f in zip(rollouts, features, strict=True):
        size = r.tokens.shape[0]
        lo, hi = max(start - offset, 0), min(stop - offset, size)
        if lo < hi:
            chunks = ChunkBatch(r.chunks.chunk_ids[lo:hi], r.chunks.tokens[lo:hi], r.chunks.step)
            out_r.append(RolloutBatch(chunks, r.tokens[lo:hi], r.behavior_logprobs[lo:hi], r.weight_version))
            out_f.append(FeatureBatch(f.chunk_ids[lo:hi], f.rollout_features[lo:hi], f.gt_features[lo:hi]))
        offset += size
    return out_r, out_f


def shard_batches(
    rollouts: list[RolloutBatch], features: list[FeatureBatch], world_size: int
) -> list[tuple[list[RolloutBatch], list[FeatureBatch]]]:
    """Split a step's documents into world_size equal contiguous shards."""
    total = sum(r.tokens.shape[0] for r in rollouts)
    if total % world_size:
        raise ValueError(f"{total} documents cannot be split evenly over {world_size} learner ranks")
    per_rank = total // world_size
    return [slice_batches(rollouts, features, i * per_rank, (i + 1) * per_rank) for i in range(world_size)]


@dataclass
class StepInputs:
    """One rank's documents of a step, concatenated over the rollout batches."""

    docs: torch.Tensor  # [N, T]
    rollouts: torch.Tensor  # [N, n, NB, G]
    behavior_logprobs: torch.Tensor  # [N, n, NB, G]
    stale: torch.Tensor  # [N] bool
    advantages: torch.Tensor  # [N, n, NB]
    alignment: torch.Tensor  # [N, n, NB]
    diversity: torch.Tensor  # [N, n, NB]
    rewards: torch.Tensor  # [N, n, NB]
    cfm: torch.Tensor  # [N, NB] unbiased conditional feature-matching estimate of the raw features


def prepare_inputs(
    rollouts: list[RolloutBatch], features: list[FeatureBatch], current_version: int, config: Config, plan: BlockPlan
) -> StepInputs:
    """Check the batches against the geometry, compute advantages, and mark stale documents."""
    if not rollouts or len(rollouts) != len(features):
        raise ValueError(
            f"need matching non-empty lists of rollout and feature batches (got {len(rollouts)} and {len(features)})"
        )
    n, NB, G, T = config.sampling.num_samples, plan.num_blocks, plan.block_length, plan.chunk_length
    for r, f in zip(rollouts, features):
        if list(r.chunks.chunk_ids) != list(f.chunk_ids):
            raise ValueError(
                f"feature batch chunks {list(f.chunk_ids)} do not match rollout chunks {list(r.chunks.chunk_ids)}"
            )
        docs = r.chunks.tokens.shape[0]
        if r.chunks.tokens.shape != (docs, T) or r.tokens.shape != (docs, n, NB, G):
            raise ValueError(
                f"rollout batch has chunk tokens {tuple(r.chunks.tokens.shape)} and samples {tuple(r.tokens.shape)}; "
                f"the configuration expects [docs, {T}] and [docs, {n}, {NB}, {G}]"
            )
        if r.weight_version > current_version:
            raise ValueError(
                f"rollouts of weight version {r.weight_version} are newer than the learner's {current_version}"
            )
        if current_version - r.weight_version > config.training.max_staleness:
            raise ValueError(
                f"rollouts of weight version {r.weight_version} are {current_version - r.weight_version} versions old; "
                f"training.max_staleness={config.training.max_staleness}"
            )
    rollout_features = torch.cat([f.rollout_features for f in features])  # [N, NB, n, D]
    gt_features = torch.cat([f.gt_features for f in features])  # [N, NB, D]
    reward_cfg = config.reward
    # compute_rewards groups over the second-to-last axis: [N, NB, n, D] -> results [N, NB, n].
    result = compute_rewards(rollout_features, gt_features, reward_cfg)
    per_sequence = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  [N, NB, n] -> [N, n, NB]
    stale = torch.cat([torch.full((r.tokens.shape[0],), r.weight_version < current_version) for r in rollouts])
    return StepInputs(
        docs=torch.cat([r.chunks.tokens for r in rollouts]).long(),
        rollouts=torch.cat([r.tokens for r in rollouts]).long(),
        behavior_logprobs=torch.cat([r.behavior_logprobs for r in rollouts]).float(),
        stale=stale,
        advantages=per_sequence(result.advantages),
        alignment=per_sequence(result.alignment),
        diversity=per_sequence(result.diversity),
        rewards=per_sequence(result.rewards),
        cfm=cfm_unbiased(rollout_features, gt_features),
    )
