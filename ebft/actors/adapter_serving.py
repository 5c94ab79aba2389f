"""`rollout.lora_sync: adapter`: the engine serves the pushed LoRA adapters through vLLM's own LoRA layers instead of
merging them into its weights (adapter_merge.py).

A push registers the adapters in each engine worker's LoRA manager from the tensors in memory, under the id
`version + 1` (vLLM ids start at 1), replacing the previous version's; generation then names that id in every
request. Before the first push the engine serves its base weights with no adapter: PEFT starts B at zero, so that
is the policy of version 0. An engine never sees requests with and without an adapter in one batch (vLLM's CPU
LoRA applied the adapter to the rows without one when they were mixed): each generate call names one version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

IN_MEMORY = "ebft://pushed-in-memory"
"""vLLM requires an adapter path; ours are never read from one (the id is registered before any request names it)."""


@dataclass(frozen=True)
class ServedAdapter:
    """What vLLM needs to serve a run's pushed adapters: the PEFT settings they were trained with."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> ServedAdapter | None:
        """None unless the run trains LoRA adapters and rollout.lora_sync is `adapter`."""
        lora = config.model.lora
        if lora is None or config.rollout.lora_sync != "adapter":
            return None
        return cls(lora.rank, lora.alpha, tuple(lora.target_modules))

    def engine_options(self) -> dict:
        """vLLM engine arguments: one adapter slot, of the smallest rank vLLM offers that holds ours."""
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks

        max_rank = min(r for r in get_args(MaxLoRARanks) if r >= self.rank)
        return {"enable_lora": True, "max_loras": 1, "max_cpu_loras": 1, "max_lora_rank": max_rank}


def lora_request(version: int):
    """The request naming the adapter of `version`."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"ebft-policy-v{version}", version + 1, IN_MEMORY)


def serve_adapters(model_runner, adapters: Mapping[str, torch.Tensor], version: int, served: ServedAdapter) -> None:
    """Inside an engine worker: make `adapters` (`<linear>.lora_A.weight` / `lora_B.weight`, HF names) the only
    adapter, under `version`'s id, copied into vLLM's adapter slots now rather than at the next request."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    workers_manager = model_runner.lora_manager
    manager = workers_manager._adapter_manager
    helper = PEFTHelper.from_dict(
        {"r": served.rank, "lora_alpha": served.alpha, "target_modules": list(served.target_modules)}
    )
    helper.validate_legal(workers_manager.lora_config)
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        version + 1,
        {f"base_model.model.{name}": tensor for name, tensor in adapters.items()},
        helper,
        device="cpu",
        dtype=workers_manager.lora_config.lora_dtype,
        model_vocab_size=workers_manager.vocab_size,
        weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
    )
    unknown = sorted(set(lora.loras) - set(manager.modules) - set(_packed_parts(manager)))
    if unknown:
        raise ValueError(f"pushed adapters for layers vLLM cannot serve with LoRA: {unknown[:3]}")
    workers_manager.remove_all_adapters()
    manager.add_adapter(lora)
    manager.activate_adapter(lora.id)


def _packed_parts(manager) -> list[str]:
    """Names of the HF linears vLLM packs into one layer (q/k/v into qkv_proj), as module paths."""
    parts = []
    for module_name in manager.modules:
        packed = manager.packed_modules_mapping.get(module_name.rsplit(".", 1)[-1], [])
        parts += [f"{module_name.rsplit('.', 1)[0]}.{part}" for part in packed]
    return parts
