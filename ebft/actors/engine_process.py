"""A rollout actor and its engine's EngineCore process (vLLM's V1 multiprocessing, as GPU engines run) live and die
together.

- The actor dies: the EngineCore is a plain child process that never checks its parent (vLLM has no parent-death
  signal), so it outlives a SIGKILLed actor unless it is in the actor's process group, which the raylet kills
  (Ray's process-group clean-up, on by default). That is checked when the engine starts: otherwise a replacement in
  the same bundle could not start next to the orphan holding the GPU.
- The EngineCore dies on its own: vLLM fails the next call (EngineDeadError) but a call already waiting on it hangs
  for good. A watchdog ends the actor at once, so its callers get Ray's actor-died error, which the controller
  answers by replacing it.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def engine_processes(llm) -> list:
    """The engine's EngineCore processes ([] for an engine in this process)."""
    resources = getattr(llm.llm_engine.engine_core, "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return list(getattr(manager, "processes", []))


def bind_engine_to_actor(llm) -> None:
    """Inside a Ray actor whose engine runs in its own process: check the engine dies with the actor, and end the
    actor if the engine dies first. Elsewhere (tests, `ebft eval` in-process) nothing changes."""
    import ray

    processes = engine_processes(llm)
    if not processes or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    orphans = [p.pid for p in processes if os.getpgid(p.pid) != os.getpgid(0)]
    if orphans:
        log.warning(
            "vLLM's EngineCore processes %s are outside this actor's process group: they would outlive the actor "
            "(is RAY_process_group_cleanup_enabled=0?)",
            orphans,
        )
    sentinels = [p.sentinel for p in processes]

    def watch() -> None:
        multiprocessing.connection.wait(sentinels)
        if not getattr(llm, "ebft_closing", False):
            log.error("vLLM's EngineCore process died; ending this rollout actor so that it is replaced")
            os._exit(1)

    threading.Thread(target=watch, name="engine-watchdog", daemon=True).start()


def wait_for_free_gpu_memory(
    fraction: float, timeout_s: float, memory: Callable[[], tuple[int, int]] | None = None, poll_s: float = 1.0
) -> None:
    """A replacement engine starts in its predecessor's bundle at once, but the old EngineCore frees the GPU only
    when Ray reaps it, and vLLM refuses to start unless `fraction` of the GPU is free: wait for it (at most
    `timeout_s`; then vLLM's own check says what holds the memory). `memory()`: (free, total) bytes."""
    if memory is None:
        import torch

        memory = torch.cuda.mem_get_info
    deadline = time.monotonic() + timeout_s
    free, total = memory()
    while free < fraction * total and time.monotonic() < deadline:
        time.sleep(poll_s)
        free, total = memory()
    if free < fraction * total:
        log.warning(
            "only %.1f of %.1f GiB of the GPU are free after %.0f s, where rollout.gpu_memory_utilization asks for "
            "%.0f%%: another process (an engine still exiting?) holds the rest",
            free / 2**30,
            total / 2**30,
            timeout_s,
            100 * fraction,
        )
