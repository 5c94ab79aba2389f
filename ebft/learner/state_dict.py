"""The policy's full state dict out of a DeepSpeed engine, with Hugging Face names (weight pushes, checkpoints)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ebft.learner import lora


def iter_state_dict(module: torch.nn.Module, *, zero3: bool, rank: int, device) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for each parameter and persistent buffer, yielded on rank 0 (nothing elsewhere).

    Collective under ZeRO-3: every rank must run it to the end. Partitions are gathered one module's own
    parameters at a time and copied to `device` on rank 0 before the gather is released, so the memory
    bound is one module's parameters gathered plus their copies (and whatever copies the consumer keeps):
    a weight push to a GPU never holds the whole model there. Otherwise tensors already on `device` are the
    live parameters, not copies: use them before the next step. Copies are made on the current stream: a consumer
    that reads them on another stream must synchronise first (the broadcast packs on the current stream). Tied
    weights appear once, under their first name, as in HF checkpoints.

    A policy with LoRA adapters (a PEFT model, lora.py) is exported as the plain model it amounts to: each adapted
    linear's weight merged, W + scale * B @ A, a new tensor made when its module is reached (its adapters gathered
    with it under ZeRO-3); the trained parameters are left as they are.
    """
    if rank != 0 and not zero3:
        return
    for prefix, sub, own, persistent, lora_layer in _module_entries(module):
        if zero3 and own:
            import deepspeed

            gathered = [p for _, p in own] + (lora.adapter_parameters(lora_layer) if lora_layer else [])
            with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None):
                group = _exported(prefix, own, lora_layer, device, copy=True) if rank == 0 else []
        elif rank == 0:
            group = _exported(prefix, own, lora_layer, device, copy=False)
        if rank != 0:
            continue
        group += [(_join(prefix, n), getattr(sub, n).detach().to(device)) for n in persistent]
        yield from group
        del group  # else this module's copies would stay alive through the next module's gather


def _exported(prefix: str, own, lora_layer, device, *, copy: bool) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor on `device`) of one module's own parameters; a LoRA layer's weight is merged (a new tensor)."""
    exported = []
    for name, p in own:
        if lora_layer is not None and name == "weight":
            exported.append((_join(prefix, name), lora.merged_weight(lora_layer, p.detach()).to(device)))
        else:
            exported.append((_join(prefix, name), p.detach().to(device, copy=copy)))
    return exported


def state_dict_metadata(module: torch.nn.Module) -> list[tuple[str, list[int], torch.dtype]]:
    """(HF name, shape, dtype) of what iter_state_dict yields, in its order, without gathering anything (a ZeRO-3
    parameter knows its full shape as `ds_shape`): what a receiver allocates before a streamed push."""
    metadata = []
    for prefix, sub, own, persistent, _ in _module_entries(module):
        metadata += [(_join(prefix, n), list(getattr(p, "ds_shape", p.shape)), p.dtype) for n, p in own]
        metadata += [(_join(prefix, n), list(getattr(sub, n).shape), getattr(sub, n).dtype) for n in persistent]
    return metadata


def _module_entries(module: torch.nn.Module):
    """(prefix, module, its own parameters not seen before, its persistent buffer names, LoRA layer or None) for every
    module. A LoRA layer stands for the linear it adapts (its base layer, under its own prefix: the HF name), whose
    weight is exported merged; the modules inside it are not listed."""
    seen: set[int] = set()
    inside_lora = None
    for prefix, sub in lora.transformers_model(module).named_modules():
        if inside_lora is not None and prefix.startswith(inside_lora):
            continue  # named_modules lists a module's descendants right after it
        lora_layer = sub if lora.is_lora_layer(sub) else None
        if lora_layer is not None:
            inside_lora, sub = f"{prefix}.", sub.get_base_layer()
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        persistent = [n for n, _ in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set]
        yield prefix, sub, own, persistent, lora_layer


def gather_state_dict(module: torch.nn.Module, *, zero3: bool, rank: int, device) -> dict[str, torch.Tensor] | None:
    """The whole of iter_state_dict as a dict on rank 0 (None elsewhere); collective under ZeRO-3."""
    state = dict(iter_state_dict(module, zero3=zero3, rank=rank, device=device))
    return state if rank == 0 else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
