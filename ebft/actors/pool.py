"""The rollout pool: several Ray actors, each owning one `RolloutWorker` (one vLLM engine).

A Ray actor runs one method call at a time (no async methods, max_concurrency 1), so `update_weights`
submitted while `generate` runs starts after it: every chunk batch comes from exactly one weight
version. Pool size and per-actor CPUs/GPUs come from `resources.rollout`.
"""

from __future__ import annotations

import os
from typing import Any

from ebft.config import BROADCAST_TRANSPORTS

# Environment every rollout actor needs, whatever the environment of the node's raylet.
CPU_ENGINE_ENV = {
    # In-process engine: 2-6 s start-up and 1.8 GB instead of 15-25 s and 3.1 GB.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Several engines (and other torch work) share a node's cores: no pinning to core 0.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
COMMON_ENGINE_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# Passed through from the driver when set there (offline hub, caches).
PASSED_THROUGH = ("HF_HUB_OFFLINE", "HF_HOME", "EBFT_CACHE", "VLLM_CACHE_ROOT")


def rollout_actor_env(config) -> dict[str, str]:
    env = dict(COMMON_ENGINE_ENV)
    if not config.resources.rollout.on_gpu:
        env.update(CPU_ENGINE_ENV)
    if config.rollout.batch_invariant:
        env["VLLM_BATCH_INVARIANT"] = "1"
    if config.weight_transport in BROADCAST_TRANSPORTS:
        # vLLM's weight-transfer protocol runs as GPU engines run it: the engine in its own EngineCore process.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    env.update({name: os.environ[name] for name in PASSED_THROUGH if name in os.environ})
    return env


def create_rollout_actor(config, model_path: str, placement_group=None, bundle_index: int = 0, **worker_options: Any):
    """Start one rollout actor (in bundle `bundle_index` of the group, if given); returns its handle at once.

    The engine is built inside the actor's constructor: the first call on the handle waits for it.
    `worker_options` go to `RolloutWorker` (e.g. `enforce_eager=True`, `max_model_len=...`).
    """
    import ray

    from ebft.actor_resources import actor_options
    from ebft.actors.rollout import RolloutWorker

    options = actor_options(
        config.resources.rollout,
        placement_group,
        bundle_index,
        max_concurrency=1,
        runtime_env={"env_vars": rollout_actor_env(config)},
    )
    return ray.remote(RolloutWorker).options(**options).remote(config, model_path, **worker_options)
