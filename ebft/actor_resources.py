"""Where an actor of a pool runs: its Ray options and its torch device, both from the pool's resources in the config.

One rule for devices: a pool's device comes from `resources.<pool>.gpus_per_actor`, never from what torch can
see. Ray 2.60 no longer hides the GPUs from actors that asked for none (it leaves CUDA_VISIBLE_DEVICES as the
node has it unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1), so a CPU actor on a GPU node would otherwise find
`torch.cuda.is_available()` true and pile onto GPU 0 next to a vLLM engine holding most of it. A CPU actor
therefore starts with CUDA_VISIBLE_DEVICES empty and computes on the CPU; a GPU actor uses the GPUs Ray gave it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ebft.config import PoolResources
from ebft.cpu_threads import actor_threads

NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def actor_options(resources: PoolResources, placement_group=None, bundle_index: int = 0, **extra: Any) -> dict:
    """Ray options of one actor of a pool: its CPUs and GPUs, in bundle `bundle_index` of the pool's group if given,
    its starting thread count (cpu_threads.actor_threads) and, on a CPU pool, no visible GPU."""
    runtime_env = extra.pop("runtime_env", {})
    env_vars = {"OMP_NUM_THREADS": str(actor_threads(resources))}
    if not resources.on_gpu:
        env_vars["CUDA_VISIBLE_DEVICES"] = ""
    env_vars.update(runtime_env.get("env_vars", {}))
    options: dict[str, Any] = {
        "num_cpus": resources.cpus_per_actor,
        "num_gpus": resources.gpus_per_actor,
        "resources": dict(resources.node_resources),
        "runtime_env": {**runtime_env, "env_vars": env_vars},
        **extra,
    }
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle_index
        )
    return options


def actor_device(resources: PoolResources) -> torch.device:
    """The torch device of an actor of a pool with these resources (in this process): its first GPU, cuda:0, since
    Ray (or show_only_assigned_gpus) leaves the actor its own GPUs only."""
    if not resources.on_gpu:
        return torch.device("cpu")
    return torch.device("cuda", 0)


def show_only_assigned_gpus(resources: PoolResources) -> None:
    """A cluster started with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES shows every actor every GPU. A GPU actor
    then narrows CUDA_VISIBLE_DEVICES to the GPUs Ray assigned it, in their numeric order, before CUDA starts: its
    device is cuda:0 as anywhere else, and vLLM's workers (which take cuda:{local_rank} and inherit the environment)
    land on its own GPUs, not on GPUs 0..k-1 of the node."""
    if not resources.on_gpu or os.environ.get(NOSET_CUDA_VISIBLE_DEVICES, "0").lower() in ("0", "false", ""):
        return
    import ray

    ids = sorted((str(i) for i in ray.get_gpu_ids()), key=int) if ray.is_initialized() else []
    if ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
