"""Feature map phi: hidden states of a frozen network at fixed depths, normalized per token, pooled per block.

Layer index convention (as transformers' `output_hidden_states`): 0 is the embedding output (the input of
the first decoder layer), l >= 1 is the residual stream after decoder layer l, BEFORE the final norm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

Pooling = Literal["last", "mean"]


def feature_layer_indices(num_hidden_layers: int, fractions: Sequence[float]) -> list[int]:
    """floor(f * L) for each configured fraction, in the configured order (concatenation order)."""
    if num_hidden_layers < 1:
        raise ValueError(f"the feature network needs at least one layer (got num_hidden_layers={num_hidden_layers})")
    indices = []
    for fraction in fractions:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"layer fraction {fraction} is outside [0, 1]")
        # The epsilon keeps binary rounding from dropping an exact product a layer (0.29 * 100 = 28.999...).
        indices.append(min(num_hidden_layers, math.floor(fraction * num_hidden_layers + 1e-9)))
    return indices


def token_features(
    hidden_states: Sequence[torch.Tensor] | Mapping[int, torch.Tensor], layers: Sequence[int]
) -> torch.Tensor:
    """Per-token features [B, S, D]: the chosen layers' states [B, S, H] concatenated, L2-normalized jointly.

    `hidden_states[l]` is layer l's state (a tuple from `output_hidden_states` or a dict by layer index).
    Computed in float32 whatever the model dtype, so bf16 states do not lose precision in the norm.
    """
    stacked = torch.cat([hidden_states[layer].float() for layer in layers], dim=-1)
    return torch.nn.functional.normalize(stacked, p=2.0, dim=-1, eps=1e-12)


def pool_blocks(token_features: torch.Tensor, indices: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, S, D] per-token features, [NB, G] sequence indices of each block's tokens -> [B, NB, D].

    `last` takes the block's final token (indices[:, -1]); `mean` averages its G tokens (no re-normalization).
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must be [NB, G] (got shape {tuple(indices.shape)})")
    indices = indices.to(token_features.device)
    if pooling == "last":
        return token_features[:, indices[:, -1]]
    if pooling == "mean":
        return token_features[:, indices].mean(dim=2)
    raise ValueError(f"unknown pooling {pooling!r}; use 'last' or 'mean'")
