"""LoRA on the learner's policy (`model.lora`): PEFT adapters on linear layers; only they train.

A weight push carries only the adapters (adapter_tensors): each rollout worker merges them into the base policy
(ebft/actors/adapter_merge.py) and serves a plain model. A checkpoint's HF folder holds the merged weights, which
state_dict.py exports on the fly (W + (alpha / r) B @ A per adapted linear, under the base's names), and the adapter
in PEFT's format (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ebft.config import LoraConfig
from ebft.lora_merge import merged
from ebft.lora_targets import check_target_modules

ADAPTER = "default"
"""PEFT's name of the one adapter the policy carries."""


def add_adapters(model: torch.nn.Module, lora: LoraConfig, *, seed: int):
    """The policy as a PEFT model with fresh adapters in its own dtype, every other parameter frozen. PEFT starts B at
    zero, so the adapted policy starts as the base; A is drawn from `seed` without touching the global RNG, so every
    rank, and a learner restarted from the base weights, starts from the same adapters."""
    import peft

    check_target_modules(model, lora)
    peft_config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, peft_config, autocast_adapter_dtype=False)


def transformers_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT model (its parameters under HF names, LoRA layers in place of the adapted
    linears), or `module` itself."""
    return module.get_base_model() if is_peft_model(module) else module


def is_peft_model(module: torch.nn.Module) -> bool:
    # Only a model PEFT wrapped holds its classes, and PEFT is imported then: full fine-tuning never imports it.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.PeftModel)


def is_lora_layer(module: torch.nn.Module) -> bool:
    lora = sys.modules.get("peft.tuners.lora")
    return lora is not None and isinstance(module, lora.LoraLayer)


def adapter_parameters(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a LoRA layer's merged weight reads besides its base layer's (gathered with it under ZeRO-3)."""
    return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]


def merged_weight(layer: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A LoRA layer's base `weight` plus its update scale * B @ A as a new tensor: summed in float32 and rounded once
    to the weight's dtype."""
    a, b = (p.detach() for p in adapter_parameters(layer))
    return merged(weight, a, b, layer.scaling[ADAPTER])


def adapter_state_dict(peft_model: torch.nn.Module, *, zero3: bool, rank: int) -> dict[str, torch.Tensor] | None:
    """The trainable parameters (the adapters) under the PEFT model's names, copied to the CPU on rank 0 (None
    elsewhere); collective under ZeRO-3, which gathers them all at once (adapters are small)."""
    params = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    gathered = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    with gathered:
        return {name: p.detach().to("cpu", copy=True) for name, p in params} if rank == 0 else None


def pushed_name(peft_name: str) -> str:
    """`base_model.model.<linear>.lora_A.default.weight` -> `<linear>.lora_A.weight`: an adapter's name in a push,
    its linear's HF name (ebft/actors/adapter_merge.py)."""
    return peft_name.removeprefix("base_model.model.").replace(f".{ADAPTER}.", ".")


def adapter_metadata(peft_model: torch.nn.Module) -> list[tuple[str, list[int], torch.dtype]]:
    """(pushed name, shape, dtype) of what adapter_tensors yields, in its order, without gathering anything."""
    return [
        (pushed_name(name), list(getattr(p, "ds_shape", p.shape)), p.dtype)
        for name, p in peft_model.named_parameters()
        if p.requires_grad
    ]


def adapter_tensors(
    peft_model: torch.nn.Module, *, zero3: bool, rank: int, device
) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapters under their pushed names, on rank 0 (nothing elsewhere): what a LoRA weight push carries. Collective
    under ZeRO-3: every rank must exhaust it."""
    state = adapter_state_dict(peft_model, zero3=zero3, rank=rank)
    for name, tensor in (state or {}).items():
        yield pushed_name(name), tensor.to(device)


def save_adapter(peft_model: torch.nn.Module, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """The adapter in PEFT's format (adapter_config.json, adapter_model.safetensors), loadable by
    `peft.PeftModel.from_pretrained(base_model, directory)`."""
    peft_model.save_pretrained(directory, state_dict=state, save_embedding_layers=False, safe_serialization=True)
