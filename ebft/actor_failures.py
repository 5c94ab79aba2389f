"""What counts as a dead actor: the work it had has to be done again elsewhere (the controller replaces it)."""

from __future__ import annotations

from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayActorError


class UnresponsiveActorError(RuntimeError):
    """An actor that did not answer within its bound (e.g. a rollout actor that never returned its rollouts):
    treated like a dead one, so the controller replaces it instead of the run waiting for it for good."""

    def __init__(self, actor_id: str, message: str):
        super().__init__(message)
        self.actor_id = actor_id

    def __reduce__(self):
        return type(self), (self.actor_id, str(self))


class RolloutActorsFailed(RuntimeError):
    """A weight push or connect that several rollout actors did not complete (dead, late, or ending themselves
    because the round failed): all of them are replaced at once."""

    def __init__(self, actor_ids: list[str], message: str):
        super().__init__(message)
        self.actor_ids = list(actor_ids)

    def __reduce__(self):
        return type(self), (self.actor_ids, str(self))


def is_actor_failure(error: BaseException) -> bool:
    """True when the actor that ran the task (or produced one of its inputs) is gone or unresponsive, or its result
    went with its node: the work has to be done again elsewhere."""
    failures = (
        RayActorError,
        ActorDiedError,
        ActorUnavailableError,
        ObjectLostError,
        UnresponsiveActorError,
        RolloutActorsFailed,
    )
    if isinstance(error, failures):
        return True
    cause = getattr(error, "cause", None)
    return cause is not None and cause is not error and is_actor_failure(cause)


def failed_actor_ids(error: BaseException | None) -> list[str]:
    """The ids (hex) of the actors whose death `error` reports, directly or as the cause of a task's error."""
    while error is not None:
        if isinstance(error, RolloutActorsFailed):
            return error.actor_ids
        if isinstance(error, (RayActorError, UnresponsiveActorError)) and error.actor_id:
            return [error.actor_id]
        cause = getattr(error, "cause", None)
        error = cause if cause is not error else None
    return []
