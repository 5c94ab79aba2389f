"""The one formula both ends of a LoRA run merge with: the learner when it saves a checkpoint's HF folder
(ebft/learner/lora.py), each rollout worker when a push brings adapters (ebft/actors/adapter_merge.py). Sharing it
keeps the two merges bit for bit equal."""

from __future__ import annotations

import torch


def merged(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A as a new tensor on the adapters' device: summed in float32, rounded once to W's dtype."""
    a, b = lora_a.float(), lora_b.float()
    return (weight.to(a.device).float() + (b @ a) * scale).to(weight.dtype)
