"""Training checkpoints on disk: an HF-format policy plus everything needed to resume.

A checkpoint directory holds
    config.json, generation_config.json, model.safetensors, tokenizer files   the policy, loadable by
                                                         `AutoModelForCausalLM.from_pretrained` and vLLM
                              (with model.lora: the base with the adapters merged, what the rollout engines run)
    adapter/                  with model.lora: the adapter in PEFT's format (adapter_config.json,
                              adapter_model.safetensors), loadable by `peft.PeftModel.from_pretrained(base, path)`
                              (a subfolder: in the top folder transformers would load it over its base instead)
    deepspeed/                optimizer (ZeRO partitions, fp32 master weights) and LR-scheduler state; with
                              model.lora only the adapters' (the frozen base comes from model.policy)
    rng_rank{r}.pt            each rank's RNG states
    ema/                      with training.ema: the policy's moving average as an HF model folder like the top one
    ema_rank{r}.pt            ... and each rank's float32 part of it (ZeRO-3: every rank's partition; else rank 0's)
    extra_state.pt            the caller's state (data position, ...)
    trainer_state.json        step and weight version; written last, it marks the checkpoint complete

It is written into a hidden temporary sibling and renamed into place, so a reader never sees a
half-written checkpoint; `latest_checkpoint` ignores anything without trainer_state.json.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

TRAINER_STATE = "trainer_state.json"
EXTRA_STATE = "extra_state.pt"
DEEPSPEED_DIR = "deepspeed"
ADAPTER_DIR = "adapter"
EMA_DIR = "ema"
DEEPSPEED_TAG = "state"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_PREFIX = "step_"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def checkpoint_path(root: str | Path, step: int) -> Path:
    """The conventional checkpoint directory of a step: root/step_00000012."""
    return Path(root) / f"{CHECKPOINT_PREFIX}{step:08d}"


def temporary_path(path: str | Path) -> Path:
    """Where a checkpoint is assembled before the rename (same filesystem, hidden name)."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / TRAINER_STATE).is_file()


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def completed_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints directly under root, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p)]
    return sorted(found, key=lambda p: (read_trainer_state(p)["step"], p.name))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under root, or None."""
    found = completed_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the keep_last newest complete checkpoints under root; returns what was removed."""
    doomed = completed_checkpoints(root)[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def publish(temporary: Path, final: Path) -> None:
    """Atomically move a finished temporary checkpoint to its final name (replacing an older one)."""
    final = Path(final)
    if final.exists():
        retired = final.parent / f".{final.name}.old"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(temporary, final)
        shutil.rmtree(retired)
    else:
        os.replace(temporary, final)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_policy(
    directory: Path, state_dict: dict[str, torch.Tensor], model_config, generation_config, source_dir: str | Path | None
) -> None:
    """Write an HF model folder: config, generation config, one safetensors file, tokenizer files from source_dir."""
    directory.mkdir(parents=True, exist_ok=True)
    model_config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    safetensors.torch.save_file(state_dict, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if source_dir is not None and Path(source_dir).is_dir():
        for name in _TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, directory / name)


def write_trainer_state(
    directory: Path, *, step: int, weight_version: int, world_size: int, extra_state: dict[str, Any]
) -> None:
    """Write the caller's state, then the marker that makes the checkpoint complete."""
    torch.save(extra_state, directory / EXTRA_STATE)
    _fsync_file(directory / EXTRA_STATE)
    marker = directory / TRAINER_STATE
    marker.write_text(json.dumps({"step": step, "weight_version": weight_version, "world_size": world_size}, indent=2))
    _fsync_file(marker)


def read_extra_state(path: str | Path) -> dict[str, Any]:
    """The caller's state (plain values: the data position), read without unpickling arbitrary objects."""
    return torch.load(Path(path) / EXTRA_STATE, weights_only=True)


def rng_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rng_rank{rank}.pt"


def ema_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"ema_rank{rank}.pt"


def load_ema_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was saved without training.ema; resume with the training.ema it was "
            "trained with, or start a new run in a new training.output_dir"
        )
    return torch.load(path, weights_only=True)


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so it loads with `weights_only=True`; on a CUDA `device` its
    own generator only (a CPU rank never touches CUDA: asking for every GPU's state would open a context on each)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def load_rng_state(path: Path, device: torch.device) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete, resume from an earlier one")
    state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
