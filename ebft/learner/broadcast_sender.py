"""Broadcast transports (NCCL between GPUs, gloo between CPU pools): vLLM's weight-transfer protocol, driven from the
learner's rank 0 to N rollout engines. The receiving end is ebft/actors/transfer_engines.py; the group, its guards
and the packed wire format are ebft/weight_broadcast.py.

vLLM's own trainer-side engine gives every receiver rank_offset 1, which is right for one engine (however many GPUs
it spans) but collides for several independent engines; here each engine gets its own block of ranks after the
sender's rank 0, as many as its tensor-parallel workers.

A push never hangs the run. It has one deadline, `timeout_s` (rollout.weight_sync_timeout_s) from its start, for
every receiving worker to announce that it entered the round (checked before anything is broadcast) and for every
buffer's broadcast; while rank 0 waits it also watches the receivers' acknowledgments, so a receiver that died is
noticed at once. On any failure rank 0 declares the round failed in the group's store (every receiver still inside
ends itself: see weight_broadcast.Guard), aborts its communicator and raises one error naming every rollout actor
that did not complete the round (ebft.actor_failures.RolloutActorsFailed), which the controller answers by replacing
them all, reconnecting and pushing again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ebft.actor_failures import RolloutActorsFailed, is_actor_failure
from ebft.learner.weight_sender import WeightSender, WeightStream
from ebft.weight_broadcast import POLL_S, TransferGroup, open_transfer_group, send_packed


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
        learner: int = 0,
        backend: str,
        master_address: str,
        master_port: int,
        timeout_s: float,
        device: torch.device,
        buffer_bytes: int,
    ) -> None:
        super().__init__(receivers, learner)
        self.backend, self.master_address, self.master_port = backend, master_address, master_port
        self.timeout_s, self.device, self.buffer_bytes = timeout_s, device, buffer_bytes
        self.group: TransferGroup | None = None
        self.rank_offsets: list[int] = []
        self.sizes: list[int] = []
        self.rounds = 0

    def connect(self) -> None:
        import ray

        # A receiver may still be inside the push of a learner that died: within its bound it ends itself.
        sizes = [r.weight_transfer_world_size.remote() for r in self.receivers]
        self._wait(lambda: False, sizes, time.monotonic() + 2 * self.timeout_s, "answer", until_answered=True)
        self.sizes = ray.get(sizes)
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
        deadline = time.monotonic() + self.timeout_s
        joined = [receiver.init_weight_transfer.remote(info) for receiver, info in zip(self.receivers, infos)]
        try:
            self.group = open_transfer_group(
                self.backend, self.master_address, self.master_port, 0, world_size, self.device, self.timeout_s
            )
        except Exception as error:
            raise self._failure(joined, "join the weight-transfer group") from error
        self._wait(lambda: False, joined, deadline, "join the weight-transfer group", until_answered=True)

    def _send(self, weights: Mapping[str, torch.Tensor] | WeightStream, version: int) -> list:
        if self.group is None:
            raise RuntimeError("call connect() before send(): the transfer group is not open")
        stream = as_stream(weights)
        self.rounds += 1
        info = update_info(stream.metadata, self.rounds)
        acknowledgments = [
            receiver.receive_weight_broadcast.remote(info, version, self.learner) for receiver in self.receivers
        ]
        deadline = time.monotonic() + self.timeout_s
        try:
            self._wait(self._all_entered, acknowledgments, deadline, "enter the weight push")
            send_packed(
                checked(stream),
                self.group,
                self.buffer_bytes,
                lambda done: self._wait(done, acknowledgments, deadline, "receive the weights"),
            )
        except BaseException:
            self.group.declare_failed(self.rounds)
            self.close()
            raise
        return acknowledgments

    def _all_entered(self) -> bool:
        """Every receiving worker is inside this round (announced in the store)."""
        ranks = [rank for offset, size in zip(self.rank_offsets, self.sizes) for rank in range(offset, offset + size)]
        return all(self.group.entered(self.rounds, rank) for rank in ranks)

    def _wait(
        self, done: Callable[[], bool], futures: list, deadline: float, what: str, until_answered: bool = False
    ) -> None:
        """Until `done()` (or, `until_answered`, every future answered): a future that failed meanwhile, or the
        deadline, raises the failure naming every receiver that did not answer."""
        import ray

        while not done():
            answered, _ = ray.wait(futures, num_returns=len(futures), timeout=0)
            for future in answered:
                try:
                    ray.get(future)
                except Exception:
                    raise self._failure(futures, what) from None
            if until_answered and len(answered) == len(futures):
                return
            if time.monotonic() > deadline:
                raise self._failure(futures, what)
            time.sleep(POLL_S)

    def _failure(self, futures: list, what: str) -> Exception:
        """One error naming every receiver whose call had not answered, or failed as its actor died; a receiver's
        own error (not its death) is returned as it is."""
        import ray

        answered, _ = ray.wait(futures, num_returns=len(futures), timeout=0)
        failed, causes = [], []
        for receiver, future in zip(self.receivers, futures):
            if future in answered:
                try:
                    ray.get(future)
                    continue
                except Exception as error:
                    if not is_actor_failure(error):
                        return error
                    causes.append(f"{type(error).__name__}")
            failed.append(receiver._actor_id.hex())
        causes = f" ({', '.join(sorted(set(causes)))})" if causes else ""
        message = f"rollout actors {failed} did not {what} within {self.timeout_s:g} s{causes}"
        return RolloutActorsFailed(failed, message)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group = None
