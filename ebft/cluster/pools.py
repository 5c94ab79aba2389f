"""A pool of Ray actors of one kind, each pinned to its placement-group bundle; dead ones are replaced.

When a whole node goes, Ray moves its bundles to another node with the resources; if none has them,
the replacement waits (saying so every REPLACEMENT_NOTICE_S) until a node that has them joins."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table

from ebft.actor_failures import is_actor_failure

log = logging.getLogger(__name__)
REPLACEMENT_NOTICE_S = 30.0
START_ATTEMPTS = 3


class ActorPool:
    """`create(index)` makes the actor for slot `index` (placed in bundle `index` of the pool's group)."""

    def __init__(self, name: str, create: Callable[[int], Any], size: int, group: PlacementGroup | None = None):
        self.name = name
        self.create = create
        self.group = group
        self.actors = [create(index) for index in range(size)]

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, index: int):
        return self.actors[index]

    def __iter__(self):
        return iter(self.actors)

    def index_of(self, actor_id: str | None) -> int | None:
        """The slot of the actor with this id (hex), if it is one of this pool's."""
        return next((i for i, actor in enumerate(self.actors) if actor._actor_id.hex() == actor_id), None)

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
        for attempt in range(1, START_ATTEMPTS + 1):
            self.actors[index] = self.create(index)
            try:
                self.wait_until_started(index)
                break
            except Exception as start_error:
                # e.g. placed on a node that was already going but not yet declared dead
                if not is_actor_failure(start_error) or attempt == START_ATTEMPTS:
                    raise
                log.warning("%s actor %d died while starting (%s); starting another", self.name, index, start_error)
        return True

    def wait_until_started(self, index: int) -> None:
        """Block until actor `index` runs; while its placement group has no node, say what it waits for."""
        ready = self.actors[index].__ray_ready__.remote()
        waited = 0.0
        while not ray.wait([ready], timeout=REPLACEMENT_NOTICE_S)[0]:
            waited += REPLACEMENT_NOTICE_S
            if self.group is not None and placement_group_table(self.group).get("state") != "CREATED":
                bundle = self.group.bundle_specs[index]
                log.warning(
                    "%s actor %d has waited %.0f s for a node with %s free (its node left the cluster?); start "
                    "one, e.g. `ray start --address=<head> --resources=...`: training continues when it joins",
                    self.name,
                    index,
                    waited,
                    bundle,
                )
        ray.get(ready)  # its constructor's error, if it failed

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
