"""The policy's full state dict out of a DeepSpeed engine, with Hugging Face names (weight pushes, checkpoints)."""

from __future__ import annotations

import torch


def gather_state_dict(module: torch.nn.Module, *, zero3: bool, rank: int, device) -> dict[str, torch.Tensor] | None:
    """Parameters and persistent buffers on rank 0 (None elsewhere).

    Collective under ZeRO-3 (partitions are gathered one module at a time, copied out on rank 0).
    Otherwise tensors already on `device` are the live parameters, not copies: use them before the
    next step. Tied weights appear once, under their first name, as in HF checkpoints.
    """
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if zero3 and own:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
                if rank == 0:
                    state.update({_join(prefix, n): p.detach().to(device, copy=True) for n, p in own})
        elif rank == 0:
            state.update({_join(prefix, n): p.detach().to(device) for n, p in own})
        if rank == 0:
            persistent = [n for n, _ in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set]
            state.update({_join(prefix, n): getattr(sub, n).detach().to(device) for n in persistent})
    return state if rank == 0 else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
