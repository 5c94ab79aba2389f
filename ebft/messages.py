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

    @property
    def ids(self) -> list[int]:
        return self.chunk_ids

    def part(self, start: int, stop: int) -> ChunkBatch:
        return ChunkBatch(self.chunk_ids[start:stop], self.tokens[start:stop], self.step)


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


@dataclass(frozen=True)
class VerifiableTask:
    """A question and what checks an answer to it (training.method = rlvr)."""

    question: str
    tests: tuple[str, ...] = ()
    """Pieces of test code, each run in the program's globals after the completion's code."""
    entry_point: str | None = None
    references: tuple[str, ...] = ()
    """Reference answers, for the chrF / BLEU rewards."""


@dataclass
class PromptBatch:
    """Questions to answer (training.method = rlvr): the controller's unit of work there, as ChunkBatch is EBFT's."""

    task_ids: list[int]
    """Global position of each question in the data stream (for exactly-once accounting and resume)."""
    prompts: list[list[int]]
    """Each question's token ids."""
    tasks: list[VerifiableTask]
    step: int

    @property
    def ids(self) -> list[int]:
        return self.task_ids

    def part(self, start: int, stop: int) -> PromptBatch:
        return PromptBatch(self.task_ids[start:stop], self.prompts[start:stop], self.tasks[start:stop], self.step)


@dataclass
class CompletionBatch:
    """n completions of every question of a prompt batch, each up to EOS or rlvr.max_new_tokens, from one weight
    version."""

    prompts: PromptBatch
    tokens: list[list[list[int]]]
    """[questions][n] token ids of each completion (at least one token)."""
    behavior_logprobs: list[list[list[float]]]
    """[questions][n] log-probs of each completion's tokens under the sampler (logits / temperature)."""
    texts: list[list[str]]
    weight_version: int
    elapsed_s: float = 0.0

    def part(self, start: int, stop: int) -> CompletionBatch:
        return CompletionBatch(
            self.prompts.part(start, stop),
            self.tokens[start:stop],
            self.behavior_logprobs[start:stop],
            self.texts[start:stop],
            self.weight_version,
            self.elapsed_s,
        )


@dataclass
class RewardBatch:
    """The verifier's rewards of a completion batch."""

    task_ids: list[int]
    rewards: torch.Tensor
    """[questions, n] float32."""
    outcomes: dict[str, int]
    """How many completions ended each way (code: passed, failed, timeout, ...)."""
    elapsed_s: float = 0.0

    def part(self, start: int, stop: int) -> RewardBatch:
        return RewardBatch(self.task_ids[start:stop], self.rewards[start:stop], self.outcomes, self.elapsed_s)


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
