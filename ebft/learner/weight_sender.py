"""The learner side of a weight push: one interface, one file per transport.

`make_weight_sender` picks the run's transport once (`Config.weight_transport`):
object_store_sender.py (the weights' bytes in the Ray object store; CPU or any cluster) or
nccl_sender.py (vLLM's native NCCL broadcast; GPUs). The rollout side is ebft/actors/weight_receiver.py.

A push returns at once with one acknowledgment per rollout actor; `WeightPush.confirm` waits for them
and checks that every actor applied the pushed version. A sender's versions never go back; an actor
may be sent the version it already holds (after a restart every actor gets the current weights again).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ebft.config import NCCL, Config
from ebft.messages import WeightUpdate


def ray_get(futures: list) -> list:
    import ray

    return ray.get(futures)


@dataclass
class WeightPush:
    """A push in flight: `confirm()` waits until every rollout actor applied `version` and returns it."""

    version: int
    acknowledgments: list
    wait: Callable[[list], list] = ray_get

    def confirm(self) -> int:
        reported = self.wait(self.acknowledgments)
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

    def __init__(self, receivers: Sequence[Any]) -> None:
        self.receivers = list(receivers)
        self.version: int | None = None

    def connect(self) -> None:
        """One-time handshake with the receivers (nothing for the object store)."""

    def send(self, weights: Mapping[str, torch.Tensor], version: int) -> list:
        """Start delivering `weights` as `version`; returns one acknowledgment (a future of the version the
        actor applied) per receiver."""
        if self.version is not None and version < self.version:
            raise ValueError(f"weight version {version} goes back from {self.version}")
        acknowledgments = self._send(weights, version)
        self.version = version
        return acknowledgments

    @abstractmethod
    def _send(self, weights: Mapping[str, torch.Tensor], version: int) -> list: ...

    def close(self) -> None:
        pass


def make_weight_sender(config: Config, receivers: Sequence[Any], **nccl_options) -> WeightSender:
    """The sender for this run's transport; NCCL needs `master_address=` and `master_port=`."""
    if config.weight_transport == NCCL:
        from ebft.learner.nccl_sender import NcclWeightSender

        return NcclWeightSender(receivers, **nccl_options)
    from ebft.learner.object_store_sender import ObjectStoreWeightSender

    return ObjectStoreWeightSender(receivers)
