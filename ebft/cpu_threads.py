"""How many CPU threads a pool's work runs on (README "Resources").

An actor's steady-state threads follow its Ray CPU request (Ray sets OMP_NUM_THREADS from it), so
pools that work at the same time, as generation and training do, do not oversubscribe the cores.
Work that runs alone on its node, like a held-out evaluation's generation and embedding, asks for
every core the process may run on, for that call only.
"""

from __future__ import annotations

import contextlib
import os

import torch

# vLLM's CPU worker replaces torch.set_num_threads with a function that refuses (and warns) once its
# engine is built in this process; the built-in behind it still sets the OpenMP pool.
_set_num_threads = torch._C.set_num_threads


def node_cores() -> int:
    """The cores this process may run on (its affinity mask, so a container's or cgroup's limit counts)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def all_cores(enabled: bool = True):
    """Run the block on every core of the node (if enabled), then go back to the previous thread count."""
    before = torch.get_num_threads()
    if enabled:
        _set_num_threads(node_cores())
    try:
        yield
    finally:
        if enabled:
            _set_num_threads(before)
