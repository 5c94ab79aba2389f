"""Strided block-parallel geometry and the packed layout that runs all blocks in one forward.

A chunk of T tokens has NB = (T - G - C) // s + 1 blocks. Block k's prompt is the full nested prefix
doc[:C + k*s]; its ground truth is doc[C + k*s : C + k*s + G]; n rollouts of exactly G tokens are
sampled from it.

The packed sequence of a document and `samples` rollouts of every block is [doc (T tokens)] followed,
for each sample j, by its generated tokens step-major: token t of block k of sample j sits at index
T + j*NB*G + t*NB + k, has position id C + k*s + t, and attends to its block's prefix doc[:C + k*s]
and to its own sample's block tokens 0..t. Document tokens attend causally. One forward over it
equals samples x NB separate causal forwards of prefix + block tokens, with the document computed
once (samples = 1 is the authors' layout, one sequence per (document, sample)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class BlockPlan:
    chunk_length: int  # T
    context_length: int  # C
    stride: int  # s
    block_length: int  # G
    samples: int = 1  # rollouts of every block packed behind one copy of the document

    def __post_init__(self) -> None:
        lengths = {"C": self.context_length, "s": self.stride, "G": self.block_length, "samples": self.samples}
        if any(value < 1 for value in lengths.values()):
            raise ValueError(f"C, s, G and samples must all be >= 1, got {lengths}")
        span = self.chunk_length - self.block_length - self.context_length
        if span < 0 or span % self.stride:
            raise ValueError(
                f"(T - G - C) = {span} must be a non-negative multiple of s = {self.stride} "
                f"(T={self.chunk_length}, C={self.context_length}, G={self.block_length})"
            )

    @classmethod
    def from_config(cls, config) -> BlockPlan:
        s = config.sampling
        return cls(config.data.chunk_length, s.context_length, s.stride, s.block_length)

    @property
    def num_blocks(self) -> int:
        return (self.chunk_length - self.block_length - self.context_length) // self.stride + 1

    @property
    def packed_length(self) -> int:
        return self.chunk_length + self.samples * self.num_blocks * self.block_length

    @cached_property
    def prefix_lengths(self) -> torch.Tensor:
        """[NB] length of block k's prompt, C + k*s (= the doc index of its first ground-truth token)."""
        return self.context_length + self.stride * torch.arange(self.num_blocks)

    def prompts(self, doc: Sequence[int]) -> list[Sequence[int]]:
        """The NB nested prefixes doc[:C + k*s] of one chunk (a list or a tensor)."""
        return [doc[:n] for n in self.prefix_lengths.tolist()]

    @cached_property
    def window_indices(self) -> torch.Tensor:
        """[NB, G] doc indices of each block's ground-truth window."""
        return self.prefix_lengths[:, None] + torch.arange(self.block_length)[None, :]

    # ------------------------------------------------------------------ packed layout

    @cached_property
    def generated_indices(self) -> torch.Tensor:
        """[samples, NB, G] packed index of generated token t of block k of sample j: T + j*NB*G + t*NB + k."""
        NB, G = self.num_blocks, self.block_length
        per_sample = torch.arange(G)[None, :] * NB + torch.arange(NB)[:, None]
        return self.chunk_length + torch.arange(self.samples)[:, None, None] * NB * G + per_sample

    @cached_property
    def predictor_indices(self) -> torch.Tensor:
        """[samples, NB, G] packed index whose logits predict generated token t of block k of sample j.

        Token 0 is predicted by the last prefix token (doc index C + k*s - 1), token t > 0 by the
        sample's own token t - 1 of the block.
        """
        previous = self.generated_indices - self.num_blocks
        previous[..., 0] = self.prefix_lengths - 1
        return previous

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """[S] position id of every packed token: i for doc token i, C + k*s + t for generated (j, k, t)."""
        positions = torch.arange(self.packed_length)
        positions[self.generated_indices.flatten()] = self.window_indices.repeat(self.samples, 1).flatten()
        return positions

    @cached_property
    def allowed(self) -> torch.Tensor:
        """[S, S] bool: query i may attend to key j."""
        T, S, NB = self.chunk_length, self.packed_length, self.num_blocks
        idx = torch.arange(S)
        is_doc = idx < T
        generated = (idx - T).clamp(min=0)
        # Sample, block and step of each packed token (doc tokens: sample and block -1, step = their index).
        sample = torch.where(is_doc, -1, generated // (NB * self.block_length))
        block = torch.where(is_doc, -1, generated % NB)
        step = torch.where(is_doc, idx, generated % (NB * self.block_length) // NB)
        prefix_end = torch.where(is_doc, idx + 1, self.context_length + self.stride * block)
        sees_doc = is_doc[None, :] & (idx[None, :] < prefix_end[:, None])
        same_block = (sample[:, None] == sample[None, :]) & (block[:, None] == block[None, :])
        sees_own_block = ~is_doc[:, None] & ~is_doc[None, :] & same_block & (step[None, :] <= step[:, None])
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
        """docs [..., T] + rollouts [..., samples, NB, G] -> packed token ids [..., S] (step-major per sample)."""
        if rollouts.shape[-3:] != (self.samples, self.num_blocks, self.block_length):
            raise ValueError(
                f"rollouts must end in [samples={self.samples}, NB={self.num_blocks}, G={self.block_length}], "
                f"got {tuple(rollouts.shape)}"
            )
        generated = rollouts.transpose(-1, -2).flatten(-3)  # [..., samples*G*NB], index j*G*NB + t*NB + k
        return torch.cat([docs, generated], dim=-1)
