"""LoRA pushes on the rollout side. With model.lora the learner sends only the adapters, under their linear's HF name
(`<linear>.lora_A.weight` [r, in], `<linear>.lora_B.weight` [out, r]). Each engine worker merges them into the base
policy's weights, which it reads once, W + (alpha / r) B @ A summed in float32 and rounded once to the model's dtype
(as the learner merges its checkpoints), and loads the result through the same reload as a full push. A push then
moves the adapters' bytes while the engine serves a plain model. This is `rollout.lora_sync: merged`, the default;
`adapter` serves them through vLLM's LoRA layers instead (adapter_serving.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ebft.lora_merge import merged

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class AdapterBase:
    """What a worker merges pushed adapters into: the base policy's folder, the update's scale and the model dtype."""

    path: str
    scale: float
    dtype: str

    @classmethod
    def from_config(cls, config) -> AdapterBase | None:
        """The base of a run's LoRA pushes: model.policy (not the engine's own model, which may be a checkpoint's
        merged weights); None without model.lora, or where the engine serves the adapters unmerged."""
        from ebft.model_sources import resolve_model_path

        lora = config.model.lora
        if lora is None or config.rollout.lora_sync != "merged":
            return None
        return cls(resolve_model_path(config.model.policy), lora.alpha / lora.rank, config.model.dtype)


@functools.lru_cache(maxsize=1)
def base_weights(path: str) -> dict[str, torch.Tensor]:
    """The base policy's HF-named weights (every safetensors file of its folder), opened once per worker process.
    safetensors maps the files: the tensors are views of the page cache, which a node's workers (an engine's
    tensor-parallel ranks, other engines) share, not copies of their own."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}: a LoRA push merges into the base policy's")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def merged_weights(adapters: Mapping[str, torch.Tensor], base: AdapterBase) -> Iterator[tuple[str, torch.Tensor]]:
    """The base policy's weights with every pushed adapter merged into its linear, in the base's order, one at a
    time; names that do not fit the base are an error before the first."""
    weights, dtype = base_weights(base.path), getattr(torch, base.dtype)
    linears = {name.removesuffix(LORA_A) for name in adapters if name.endswith(LORA_A)}
    expected = {linear + suffix for linear in linears for suffix in (LORA_A, LORA_B)}
    unexpected, incomplete = sorted(set(adapters) - expected), sorted(expected - set(adapters))
    missing = sorted(f"{linear}.weight" for linear in linears if f"{linear}.weight" not in weights)
    if unexpected or incomplete or missing:
        raise ValueError(
            f"a LoRA push holds lora_A and lora_B of linears of the base policy in {base.path}; got names "
            f"{unexpected[:3]} that are neither, {incomplete[:3]} missing, and no base weight {missing[:3]}"
        )
    return _each_merged(weights, adapters, linears, base.scale, dtype)


def _each_merged(weights, adapters, linears: set[str], scale: float, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, weight in weights.items():
        weight = weight.to(dtype)
        linear = name.removesuffix(".weight")
        if linear in linears:  # merged where the adapters arrived: on the GPU under NCCL
            weight = merged(weight, adapters[linear + LORA_A], adapters[linear + LORA_B], scale)
        yield name, weight
