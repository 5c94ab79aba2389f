"""Broadcast transports (NCCL between GPUs, gloo between CPU pools): vLLM's weight-transfer protocol, driven from the
learner's rank 0 to N rollout engines. The receiving ends are ebft/actors/transfer_engines.py; the group and the
packed wire format are ebft/weight_broadcast.py.

vLLM's own trainer-side engine gives every receiver rank_offset 1, which is right for one engine (however many GPUs
it spans) but collides for several independent engines; here each engine gets its own block of ranks after the
sender's rank 0, as many as its tensor-parallel workers.

A push never hangs the run. Each wait is bounded by `timeout_s` (rollout.weight_sync_timeout_s): the rendezvous,
every receiving worker's announcement that it entered the round (checked before anything is broadcast), each
buffer's broadcast. A receiver that fails or does not answer is reported as that actor's failure
(ebft.actor_failures), which the controller answers by replacing it, reconnecting and pushing again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ebft.actor_failures import UnresponsiveActorError, is_actor_failure
from ebft.learner.weight_sender import WeightSender, WeightStream
from ebft.weight_broadcast import TransferGroup, open_transfer_group, send_packed

POLL_S = 0.05


def update_info(metadata: Sequence[tuple[str, list[int], torch.dtype]], round_index: int) -> dict[str, Any]:
    """What the receivers allocate before a round (vLLM's NCCL update info, plus the round)."""
    return {
        "names": [name for name, _, _ in metadata],
        "dtype_names": [str(dtype).removeprefix("torch.") for _, _, dtype in metadata],
        "shapes": [list(shape) for _, shape, _ in metadata],
        "round_index": round_index,
    }


def as_stream(weights: Mapping[str, torch.Tensor] | WeightStream) -> WeightStream:
    if isinstance(weights, WeightStream):
        return weights
    return WeightStream([(name, list(t.shape), t.dtype) for name, t in weights.items()], weights.items())


def checked(stream: WeightStream) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream's tensors, each checked against the metadata the receivers were given (a mismatch would
    silently shift every later tensor's bytes)."""
    tensors = iter(stream.tensors)
    for name, shape, dtype in stream.metadata:
        got, tensor = next(tensors, (None, None))
        if got != name or tensor is None or list(tensor.shape) != list(shape) or tensor.dtype != dtype:
            described = None if tensor is None else (list(tensor.shape), tensor.dtype)
            raise RuntimeError(f"weight stream gave {got} {described} where {name} {(shape, dtype)} was announced")
        yield name, tensor
    if next(tensors, None) is not None:
        raise RuntimeError("the weight stream has more tensors than it announced")


class BroadcastWeightSender(WeightSender):
    def __init__(
        self,
        receivers: Sequence[Any],
        *,
        backend: str,
        master_address: str,
        master_port: int,
        timeout_s: float,
        device: torch.device,
        buffer_bytes: int,
    ) -> None:
        super().__init__(receivers)
        self.backend, self.master_address, self.master_port = backend, master_address, master_port
        self.timeout_s, self.device, self.buffer_bytes = timeout_s, device, buffer_bytes
        self.group: TransferGroup | None = None
        self.rank_offsets: list[int] = []
        self.sizes: list[int] = []
        self.rounds = 0

    def connect(self) -> None:
        # A receiver may still be inside a push of a learner that died: it gives up after its own bound.
        self.sizes = self._wait([r.weight_transfer_world_size.remote() for r in self.receivers], 2 * self.timeout_s)
        self.rank_offsets = [1 + sum(self.sizes[:i]) for i in range(len(self.sizes))]
        world_size = 1 + sum(self.sizes)
        infos = [
            {
                "master_address": self.master_address,
                "master_port": self.master_port,
                "rank_offset": offset,
                "world_size": world_size,
                "packed": True,
                "packed_buffer_size_bytes": self.buffer_bytes,
                "timeout_s": self.timeout_s,
            }
            for offset in self.rank_offsets
        ]
        # The receivers block in the rendezvous until rank 0 joins: start them first.
        joined = [receiver.init_weight_transfer.remote(info) for receiver, info in zip(self.receivers, infos)]
        try:
            self.group = open_transfer_group(
                self.backend, self.master_address, self.master_port, 0, world_size, self.device, self.timeout_s
            )
        except Exception as error:
            raise self._failure(joined, "join the weight-transfer group") from error
        self._wait(joined, self.timeout_s)

    def _send(self, weights: Mapping[str, torch.Tensor] | WeightStream, version: int) -> list:
        if self.group is None:
            raise RuntimeError("call connect() before send(): the transfer group is not open")
        stream = as_stream(weights)
        self.rounds += 1
        info = update_info(stream.metadata, self.rounds)
        acknowledgments = [receiver.receive_weight_broadcast.remote(info, version) for receiver in self.receivers]
        try:
            self._wait_entered(acknowledgments)
            send_packed(checked(stream), self.group, self.buffer_bytes)
        except Exception as error:
            self.close()  # receivers inside the broadcast fail it at once, tear their group down and answer
            if is_actor_failure(error):
                raise
            raise self._failure(acknowledgments, "receive the weights") from error
        return acknowledgments

    def _wait_entered(self, acknowledgments: list) -> None:
        """Every receiving worker is inside this round (announced in the store), or the receiver's call failed."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        while True:
            missing = [
                i for i, ranks in enumerate(self._ranks()) if not all(self.group.entered(self.rounds, r) for r in ranks)
            ]
            if not missing:
                return
            failed, _ = ray.wait([acknowledgments[i] for i in missing], num_returns=1, timeout=POLL_S)
            if failed:
                ray.get(failed)  # raises the receiver's error
            if time.monotonic() > deadline:
                self.close()
                raise self._failure(acknowledgments, "enter the weight push", [acknowledgments[i] for i in missing])

    def _ranks(self) -> list[range]:
        return [range(offset, offset + size) for offset, size in zip(self.rank_offsets, self.sizes)]

    def _wait(self, futures: list, timeout_s: float) -> list:
        import ray

        done, late = ray.wait(futures, num_returns=len(futures), timeout=timeout_s)
        if late:
            raise self._failure(futures, "answer", late)
        return ray.get(futures)

    def _failure(self, futures: list, what: str, late: list = ()) -> Exception:
        """The error that names the receiver to blame: one whose call failed as an actor failure, else one that had
        not answered in time (`late`, or still running now: unresponsive); else whatever error a receiver raised."""
        import ray

        done, _ = ray.wait(futures, num_returns=len(futures), timeout=min(self.timeout_s, 10.0))
        done = [future for future in done if future not in late]
        errors = []
        for future in done:
            try:
                ray.get(future)
            except Exception as error:
                errors.append(error)
        for error in errors:
            if is_actor_failure(error):
                return error
        for receiver, future in zip(self.receivers, futures):
            if future not in done:
                actor_id = receiver._actor_id.hex()
                return UnresponsiveActorError(
                    actor_id, f"rollout actor {actor_id} did not {what} within {self.timeout_s:g} s"
                )
        return errors[0] if errors else RuntimeError(f"the weight push failed while the receivers {what}")

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group = None
