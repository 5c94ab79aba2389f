"""The learner side of a weight push: one interface, one file per kind of transport.

`make_weight_sender` picks the run's transport once (`Config.weight_transport`):
object_store_sender.py (the weights' bytes in the Ray object store; CPU or any cluster) or
broadcast_sender.py (vLLM's weight-transfer protocol: NCCL between GPUs, gloo between CPU pools). The rollout
side is ebft/actors/weight_receiver.py.

A push returns at once with one acknowledgment per rollout actor; `WeightPush.confirm` waits for them (within the
push's bound) and checks that every actor applied the pushed version. A sender's versions never go back; an actor
may be sent the version it already holds (after a restart every actor gets the current weights again).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ebft.config import BROADCAST_TRANSPORTS, Config
from ebft.messages import WeightUpdate


@dataclass
class WeightStream:
    """Weights that arrive one module at a time (ZeRO-3 gathers them so), their names, shapes and dtypes known
    first: a broadcast sends them without holding the whole model on the device at once."""

    metadata: list[tuple[str, list[int], torch.dtype]]
    tensors: Iterable[tuple[str, torch.Tensor]]


@dataclass
class WeightPush:
    """A push in flight: `confirm()` waits until every rollout actor applied `version` and returns it."""

    version: int
    acknowledgments: list
    actor_ids: list[str]
    timeout_s: float

    def confirm(self) -> int:
        """Raises an actor's failure (ebft.actor_failures) naming every actor that died or did not answer within the
        bound; another error a receiver raised is raised as it is."""
        import ray

        from ebft.actor_failures import RolloutActorsFailed, is_actor_failure

        done, _ = ray.wait(self.acknowledgments, num_returns=len(self.acknowledgments), timeout=self.timeout_s)
        reported, failed = [], []
        for actor_id, acknowledgment in zip(self.actor_ids, self.acknowledgments):
            if acknowledgment not in done:
                failed.append(actor_id)
                continue
            try:
                reported.append(ray.get(acknowledgment))
            except Exception as error:
                if not is_actor_failure(error):
                    raise
                failed.append(actor_id)
        if failed:
            raise RolloutActorsFailed(failed, f"rollout actors {failed} did not apply weight version {self.version}")
        if any(v != self.version for v in reported):
            raise RuntimeError(f"rollout actors report versions {reported} after a push of version {self.version}")
        return self.version


def state_dict_to_update(state_dict: Mapping[str, torch.Tensor], version: int) -> WeightUpdate:
    """HF-named weights as a `WeightUpdate` (dtypes kept).

    Tensors that share storage (tied input/output embeddings) are sent once, under the first name:
    vLLM's tied models load the embedding and ignore `lm_head`.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in state_dict.items():
        alias_key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if alias_key not in seen:
            seen.add(alias_key)
            tensors[name] = tensor
    return WeightUpdate.from_state_dict(tensors, version)


class WeightSender(ABC):
    """Rank 0 of the learner: deliver weights of one version to every rollout actor."""

    def __init__(self, receivers: Sequence[Any], learner: int = 0) -> None:
        """`learner`: the incarnation of the learner group sending (larger for a group started later): its pushes
        may go back from an earlier group's versions."""
        self.receivers = list(receivers)
        self.learner = learner
        self.version: int | None = None

    def connect(self) -> None:
        """One-time handshake with the receivers (nothing for the object store)."""

    def send(self, weights: Mapping[str, torch.Tensor] | WeightStream, version: int) -> list:
        """Start delivering `weights` as `version`; returns one acknowledgment (a future of the version the
        actor applied) per receiver."""
        if self.version is not None and version < self.version:
            raise ValueError(f"weight version {version} goes back from {self.version}")
        acknowledgments = self._send(weights, version)
        self.version = version
        return acknowledgments

    @abstractmethod
    def _send(self, weights: Mapping[str, torch.Tensor] | WeightStream, version: int) -> list: ...

    def close(self) -> None:
        pass


def make_weight_sender(config: Config, receivers: Sequence[Any], learner: int = 0, **broadcast_options) -> WeightSender:
    """The sender for this run's transport; a broadcast needs `master_address=`, `master_port=` and `device=`."""
    if config.weight_transport in BROADCAST_TRANSPORTS:
        from ebft.learner.broadcast_sender import BroadcastWeightSender

        rollout = config.rollout
        return BroadcastWeightSender(
            receivers,
            learner=learner,
            backend=config.weight_transport,
            timeout_s=rollout.weight_sync_timeout_s,
            buffer_bytes=int(rollout.weight_buffer_mib * 2**20),
            **broadcast_options,
        )
    from ebft.learner.object_store_sender import ObjectStoreWeightSender

    return ObjectStoreWeightSender(receivers, learner)
