"""The typed messages that travel between the pools, defined once.

Rollout actors, feature workers and the learner never import each other; they exchange only these.
Shapes use: docs = chunks in the batch, n = samples per block, NB = blocks per chunk, G = block
length, T = chunk length, D = feature dimension.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
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
    """[docs, NB, n, D] float32: each block's n samples together, as the reward kernel groups them."""
    gt_features: torch.Tensor
    """[docs, NB, D] float32."""
    elapsed_s: float = 0.0
    """Seconds the worker spent computing these features."""


@dataclass
class WeightUpdate:
    """New policy weights for the rollout actors (CPU / object-store transport).

    Each tensor travels as its raw bytes in a numpy array: Ray copies numpy buffers into the object store
    once when the update is put and hands them to every reader without a copy, where serialising to one
    safetensors blob would copy the weights twice more on each side.
    """

    version: int
    raw: dict[str, np.ndarray | bytes]
    """HF name -> the tensor's bytes (uint8, C order; `bytes` once msgpack carried them to another process)."""
    layouts: dict[str, tuple[str, tuple[int, ...]]]
    """HF name -> (torch dtype name, shape)."""

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], version: int) -> WeightUpdate:
        """Zero-copy views of CPU tensors (the caller keeps them unchanged until the update is put)."""
        raw, layouts = {}, {}
        for name, tensor in state_dict.items():
            tensor = tensor.detach().to("cpu").contiguous()
            raw[name] = tensor.reshape(-1).view(torch.uint8).numpy()
            layouts[name] = (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        return cls(version, raw, layouts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights as tensors viewing the received buffers, which are read-only: copy before changing them."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {
                name: torch.from_numpy(np.frombuffer(self.raw[name], np.uint8)).view(getattr(torch, dtype)).view(shape)
                for name, (dtype, shape) in self.layouts.items()
            }
