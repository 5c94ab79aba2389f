"""A pool of Ray actors of one kind, each pinned to its placement-group bundle; dead ones are replaced."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

log = logging.getLogger(__name__)


def is_actor_failure(error: BaseException) -> bool:
    """True when the actor that ran the task (or produced one of its inputs) is gone."""
    if isinstance(error, (RayActorError, ActorDiedError, ActorUnavailableError)):
        return True
    cause = getattr(error, "cause", None)
    return cause is not None and cause is not error and is_actor_failure(cause)


class ActorPool:
    """`create(index)` makes the actor for slot `index` (placed in bundle `index` of the pool's group)."""

    def __init__(self, name: str, create: Callable[[int], Any], size: int):
        self.name = name
        self.create = create
        self.actors = [create(index) for index in range(size)]

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, index: int):
        return self.actors[index]

    def __iter__(self):
        return iter(self.actors)

    def replace(self, index: int, failed: Any, error: BaseException) -> bool:
        """Replace actor `index` if it is still the `failed` handle; False if it was replaced already.

        Comparing handles (not pinging) never mistakes a busy actor for a dead one.
        """
        if self.actors[index] is not failed:
            return False
        log.warning("%s actor %d died (%s); starting a replacement", self.name, index, type(error).__name__)
        try:
            ray.kill(failed, no_restart=True)
        except Exception:
            pass
        self.actors[index] = self.create(index)
        return True

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
