"""Strided block-parallel geometry and the packed layout that runs all blocks in one forward.

A chunk of T tokens has NB = (T - G - C) // s + 1 blocks. Block k's prompt is the full nested prefix
doc[:C + k*s]; its ground truth is doc[C + k*s : C + k*s + G]; n rollouts of exactly G tokens are
sampled from it.

The packed sequence of one (document, sample) is [doc (T tokens)] + [generated tokens, step-major]:
generated token t of block k sits at index T + t*NB + k, has position id C + k*s + t, and attends to
its block's prefix doc[:C + k*s] and to its own block's tokens 0..t. Document tokens attend causally.
One forward over it equals NB separate causal forwards of prefix + block tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class BlockPlan:
    chunk_length: int  # T
    context_length: int  # C
    stride: int  # s
    block_length: int  # G

    def __post_init__(self) -> None:
        span = self.chunk_length - self.block_length - self.context_length
        if span < 0 or span % self.stride:
            raise ValueError(
                f"(T - G - C) = {span} must be a non-negative multiple of s = {self.stride} "
                f"(T={self.chunk_length}, C={self.context_length}, G={self.block_length})"
            )

    @classmethod
    def from_config(cls, config) -> "BlockPlan":
        s = config.sampling
        return cls(config.data.chunk_length, s.context_length, s.stride, s.block_length)

    @property
    def num_blocks(self) -> int:
        return (self.chunk_length - self.block_length - self.context_length) // self.stride + 1

    @property
    def packed_length(self) -> int:
        return self.chunk_length + self.num_blocks * self.block_length

    @cached_property
    def prefix_lengths(self) -> torch.Tensor:
        """[NB] length of block k's prompt, C + k*s (= the doc index of its first ground-truth token)."""
        return self.context_length + self.stride * torch.arange(self.num_blocks)

    def prompts(self, doc: torch.Tensor) -> list[torch.Tensor]:
        """The NB nested prefixes doc[:C + k*s] of one chunk."""
        return [doc[:n] for n in self.prefix_lengths.tolist()]

    @cached_property
    def window_indices(self) -> torch.Tensor:
        """[NB, G] doc indices of each block's ground-truth window."""
        return self.prefix_lengths[:, None] + torch.arange(self.block_length)[None, :]

    def ground_truth(self, docs: torch.Tensor) -> torch.Tensor:
        """[..., T] -> [..., NB, G] ground-truth continuation of every block."""
        return docs[..., self.window_indices]

    # ------------------------------------------------------------------ packed layout

    @cached_property
    def generated_indices(self) -> torch.Tensor:
        """[NB, G] index in the packed sequence of generated token t of block k: T + t*NB + k."""
        NB, G = self.num_blocks, self.block_length
        return self.chunk_length + torch.arange(G)[None, :] * NB + torch.arange(NB)[:, None]

    @cached_property
    def predictor_indices(self) -> torch.Tensor:
        """[NB, G] packed index whose logits predict generated token t of block k.

        Token 0 is predicted by the last prefix token (doc index C + k*s - 1), token t > 0 by the
        block's own token t - 1.
        """
        previous = self.generated_indices - self.num_blocks
        previous[:, 0] = self.prefix_lengths - 1
        return previous

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """[S] position id of every packed token: i for doc token i, C + k*s + t for generated (k, t)."""
        positions = torch.arange(self.packed_length)
        positions[self.generated_indices.flatten()] = self.window_indices.flatten()
        return positions

    @cached_property
    def allowed(self) -> torch.Tensor:
        """[S, S] bool: query i may attend to key j."""
        T, S = self.chunk_length, self.packed_length
        idx = torch.arange(S)
        is_doc = idx < T
        # Block and step of each packed token (doc tokens: block -1, step = their index).
        block = torch.where(is_doc, -1, (idx - T) % self.num_blocks)
        step = torch.where(is_doc, idx, (idx - T) // self.num_blocks)
        prefix_end = torch.where(is_doc, idx + 1, self.context_length + self.stride * block)
        sees_doc = is_doc[None, :] & (idx[None, :] < prefix_end[:, None])
        sees_own_block = (
            ~is_doc[:, None] & ~is_doc[None, :] & (block[:, None] == block[None, :]) & (step[None, :] <= step[:, None])
        )
        return sees_doc | sees_own_block

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[1, 1, S, S] additive float mask (0 allowed, finfo.min blocked).

        transformers accepts a 4-D mask as given; it must be additive float: a boolean 4-D mask is
        silently wrong with eager attention.
        """
        mask = torch.zeros(self.allowed.shape, dtype=dtype)
        mask.masked_fill_(~self.allowed, torch.finfo(dtype).min)
        return mask[None, None]

    def pack(self, docs: torch.Tensor, rollouts: torch.Tensor) -> torch.Tensor:
        """docs [..., T] + rollouts [..., NB, G] -> packed token ids [..., S] (step-major)."""
        generated = rollouts.transpose(-1, -2).flatten(-2)  # [..., G*NB], index t*NB + k
        return torch.cat([docs, generated], dim=-1)
