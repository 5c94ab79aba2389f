"""The typed messages that travel between the pools, defined once.

Rollout actors, feature workers and the learner never import each other; they exchange only these.
Shapes use: docs = chunks in the batch, n = samples per block, NB = blocks per chunk, G = block
length, T = chunk length, D = feature dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkBatch:
    """Document chunks to train on: the controller's unit of work."""

    chunk_ids: list[int]
    """Global position of each chunk in the data stream (for exactly-once accounting and resume)."""
    tokens: torch.Tensor
    """[docs, T] int64 token ids."""
    step: int
    """The optimizer step these chunks are scheduled for (seeds sampling deterministically)."""


@dataclass
class RolloutBatch:
    """n sampled continuations of G tokens at every block of every chunk, from one weight version."""

    chunks: ChunkBatch
    tokens: torch.Tensor
    """[docs, n, NB, G] int64 sampled token ids."""
    behavior_logprobs: torch.Tensor
    """[docs, n, NB, G] float32 log-probs of the sampled tokens under the sampler (logits / temperature)."""
    weight_version: int
    elapsed_s: float = 0.0
    """Seconds the actor spent generating this batch."""


@dataclass
class FeatureBatch:
    """Pooled features of a rollout batch and of its ground truth; nothing per-token."""

    chunk_ids: list[int]
    rollout_features: torch.Tensor
    """[docs, n, NB, D] float32."""
    gt_features: torch.Tensor
    """[docs, NB, D] float32."""
    elapsed_s: float = 0.0
    """Seconds the worker spent computing these features."""


@dataclass
class WeightUpdate:
    """New policy weights for the rollout actors, as safetensors bytes (CPU / object-store transport)."""

    version: int
    safetensors: bytes
