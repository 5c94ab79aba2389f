"""How many CPU threads each actor runs (README "Resources").

Measured on one 2-core node with the demo's layout (generation and features overlapping training,
max_staleness 1): cores partitioned, one thread per 0.5-CPU actor, 12.3 s a step; the learner on both
cores while the engines keep theirs, 16.2 s; every actor on both cores, 16.0 s (18 s with passive
OpenMP waits). Oversubscribed cores lose more than the learner's second thread gains. So an actor
keeps floor(cpus_per_actor) threads, at least 1, while the pools overlap; a CPU learner rank takes its
node's cores (split evenly between the learner ranks there) only when nothing overlaps its training
(training.max_staleness 0). Work that runs alone on its node, like a held-out evaluation's generation
and embedding, takes every core for that call only. `resources.<pool>.threads` overrides the count;
on GPUs the threads only feed the device and follow cpus_per_actor.
"""

from __future__ import annotations

import contextlib
import os

import torch

# vLLM's CPU worker replaces torch.set_num_threads with a function that refuses (and warns) once its
# engine is built in this process; the built-in behind it still sets the OpenMP pool.
_set_num_threads = torch._C.set_num_threads


def set_threads(count: int) -> None:
    """Set this process's torch (OpenMP) thread count, also after a vLLM engine was built in it."""
    _set_num_threads(max(1, count))


def actor_threads(resources, *, trains_alone: bool = False, ranks_on_node: int = 1) -> int:
    """Threads for one actor of a pool with these `PoolResources` (see the module docstring);
    `trains_alone`: a learner rank whose training nothing overlaps."""
    if resources.threads is not None:
        return resources.threads
    if trains_alone and not resources.on_gpu:
        return max(1, node_cores() // ranks_on_node)
    return max(1, int(resources.cpus_per_actor))


def node_cores() -> int:
    """The cores this process may run on (its affinity mask, so a container's or cgroup's limit counts)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def all_cores(enabled: bool = True):
    """Run the block on every core of the node (if enabled), then go back to the previous thread count."""
    before = torch.get_num_threads()
    if enabled:
        set_threads(node_cores())
    try:
        yield
    finally:
        if enabled:
            set_threads(before)
