"""How a run stops: a requested stop (Ctrl-C, SIGTERM) finishes the step and checkpoints; a SIGTERM to the run's
process group reaches only the driver, since the local Ray cluster's processes have groups of their own; a pool
lost during a stop ends the run at once, naming the checkpoint to resume from."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import contextmanager

import ray

from ebft.cluster.controller import Controller

log = logging.getLogger(__name__)


@contextmanager
def ray_processes_in_groups_of_their_own():
    """The local Ray cluster's processes (GCS, raylet and the workers it forks, ...) each start in a process group of
    their own: a SIGTERM to the run's group (`timeout`, a batch scheduler's cancel, a service manager) then reaches
    only this driver, which stops after the step and checkpoints as on Ctrl-C (Ray blocks SIGINT in its processes),
    instead of killing the cluster under it. On Linux Ray ties each to this process's life (PR_SET_PDEATHSIG), not
    to the group; elsewhere its reaper kills the driver's group, so the groups stay as they are there. ray.init has
    no such option; ray 2.60 starts each process through `ray._private.services.ConsolePopen`."""
    if not sys.platform.startswith("linux"):
        yield
        return
    from ray._private import services

    popen = services.ConsolePopen

    class OwnGroupPopen(popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, process_group=0, **kwargs)

    services.ConsolePopen = OwnGroupPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


@contextmanager
def stop_on_interrupt(controller: Controller):
    """The first Ctrl-C (or SIGTERM) lets the step being trained finish, then the run checkpoints and
    stops (`--resume` continues it); a second Ctrl-C aborts at once. A second SIGTERM does not: `timeout` sends
    its SIGTERM to the run and to its group, and a scheduler that wants it gone at once sends SIGKILL."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in signals}

    def request_stop(number, frame):
        if controller.stop_requested:
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            return
        controller.stop_requested = True
        log.warning(
            "%s: stopping after step %d, then saving a checkpoint (Ctrl-C again to abort without one)",
            signal.Signals(number).name,
            controller.step + 1,
        )

    for number in signals:
        signal.signal(number, request_stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def failed_during_stop(controller: Controller, error: Exception) -> None:
    """A pool failed after a stop was requested: a scheduler's or a service manager's SIGTERM to every process of the
    run reaches Ray's processes too. Named at once, before the pools' shutdown, which may not come back."""
    saved = controller.restore_point.checkpoint
    resume = f"`--resume` continues from {saved}" if saved else "no checkpoint was saved"
    message = f"a pool failed during the requested stop ({type(error).__name__}), in step {controller.step + 1}"
    log.error("%s; %s", message, resume)
    raise RuntimeError(f"{message}; {resume}") from error


def local_cluster_alive() -> bool:
    """False once a process of the local Ray cluster this driver started has died; a driver connected to a cluster
    it did not start always sees True."""
    node = ray._private.worker._global_node
    return node is None or node.remaining_processes_alive()
