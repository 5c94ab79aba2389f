"""The broadcast weight transfer that both ends share: the learner's rank 0 sends, every rollout engine's workers
receive (ebft/learner/broadcast_sender.py and ebft/actors/transfer_engines.py, which never import each other).

A transfer group is vLLM's rendezvous (`StatelessProcessGroup`: a TCP store served by rank 0) plus a communicator:
NCCL between GPUs (vLLM's `PyNcclCommunicator`), gloo between CPU processes. Tensors travel packed, in uint8
buffers of at most `buffer_bytes` (plus the one tensor that crosses the bound), cut exactly as vLLM's packed NCCL
consumer cuts them, so one sender serves vLLM's own NCCL engine and ebft's gloo engine.

Nothing here can hang: every receiving worker announces in the store that it entered a round before rank 0
broadcasts anything, and every broadcast waits for its completion for a bounded time (gloo's own timeout; on CUDA
an event polled until the deadline, then the communicator aborted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

POLL_S = 0.005


class TransferTimeout(TimeoutError):
    """A transfer that did not complete within its bound; the group that carried it is closed."""


def entered_key(round_index: int, rank: int) -> str:
    return f"ebft/entered/{round_index}/{rank}"


@dataclass
class TransferGroup:
    """One end of a transfer group: `broadcast` from rank 0, bounded by `timeout_s`."""

    backend: str
    rank: int
    world_size: int
    store: Any  # torch.distributed.Store shared by the group
    communicator: Any  # vLLM's PyNcclCommunicator, or a torch ProcessGroupGloo
    timeout_s: float

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0 sends `tensor`, the others receive into it; raises TransferTimeout past the bound."""
        if self.backend == "gloo":
            options = torch.distributed.BroadcastOptions()
            options.rootRank = 0
            try:
                self.communicator.broadcast([tensor], options).wait(timedelta(seconds=self.timeout_s))
            except RuntimeError as error:
                self.close()
                raise TransferTimeout(f"gloo broadcast failed: {error}") from error
            return
        stream = torch.cuda.current_stream(tensor.device)
        self.communicator.broadcast(tensor, src=0, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                self.close()  # ncclCommAbort: the kernels waiting for a peer that never comes are ended
                raise TransferTimeout(f"an NCCL broadcast did not complete within {self.timeout_s:g} s")
            time.sleep(POLL_S)

    def entered(self, round_index: int, rank: int) -> bool:
        return self.store.check([entered_key(round_index, rank)])

    def announce_entered(self, round_index: int) -> None:
        self.store.set(entered_key(round_index, self.rank), b"1")

    def close(self) -> None:
        communicator, self.communicator = self.communicator, None
        if communicator is not None and hasattr(communicator, "destroy"):
            communicator.destroy()


def open_transfer_group(
    backend: str, host: str, port: int, rank: int, world_size: int, device: torch.device, timeout_s: float
) -> TransferGroup:
    """Join the group (rank 0 serves the store); blocks until all `world_size` ranks joined, or `timeout_s`."""
    from vllm.distributed.utils import StatelessProcessGroup

    rendezvous = StatelessProcessGroup.create(host, port, rank, world_size, store_timeout=max(1, int(timeout_s)))
    if backend == "nccl":
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.utils.nccl import unpinned_nccl_env

        with unpinned_nccl_env():
            communicator = PyNcclCommunicator(rendezvous, device=device)
    elif backend == "gloo":
        store = torch.distributed.PrefixStore("ebft/gloo/", rendezvous.store)
        communicator = torch.distributed.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))
    else:
        raise ValueError(f"unknown transfer backend {backend!r}: nccl or gloo")
    return TransferGroup(backend, rank, world_size, rendezvous.store, communicator, timeout_s)


def as_transfer_group(nccl_communicator, timeout_s: float) -> TransferGroup:
    """A TransferGroup around the PyNcclCommunicator vLLM's own NCCL set-up made (its store is the rendezvous's)."""
    rendezvous = nccl_communicator.group
    return TransferGroup("nccl", rendezvous.rank, rendezvous.world_size, rendezvous.store, nccl_communicator, timeout_s)


def send_packed(named: Iterable[tuple[str, torch.Tensor]], group: TransferGroup, buffer_bytes: int) -> None:
    """Rank 0: broadcast the tensors packed in buffers, packing each one on the current stream only after the
    previous one arrived (so a tensor copied there, e.g. gathered under ZeRO-3, is complete when packed, and at most
    one buffer of copies is alive)."""
    for batch in packed_batches(named, buffer_bytes):
        group.broadcast(torch.cat([tensor.contiguous().view(-1).view(torch.uint8) for _, tensor in batch]))


def receive_packed(
    metadata: Iterable[tuple[str, list[int], torch.dtype]],
    group: TransferGroup,
    buffer_bytes: int,
    device: torch.device,
    load: Callable[[list[tuple[str, torch.Tensor]]], Any],
) -> None:
    """A receiver: the buffers `send_packed` sends, cut the same way, each unpacked and handed to `load`."""
    announced = ((name, torch.empty(shape, dtype=dtype, device="meta")) for name, shape, dtype in metadata)
    for batch in packed_batches(announced, buffer_bytes):
        packed = torch.empty(sum(nbytes(t) for _, t in batch), dtype=torch.uint8, device=device)
        group.broadcast(packed)
        views, start = [], 0
        for name, tensor in batch:
            piece = packed[start : start + nbytes(tensor)]
            if start % tensor.element_size():  # a view of another dtype must start on its alignment
                piece = piece.clone()
            views.append((name, piece.view(tensor.dtype).view(tensor.shape)))
            start += nbytes(tensor)
        load(views)


def packed_batches(named: Iterable[tuple[str, torch.Tensor]], buffer_bytes: int) -> Iterator[list]:
    """Consecutive groups of (name, tensor), each closed by the tensor that takes it past `buffer_bytes`: the cut
    vLLM's packed NCCL consumer makes, so its engines decode what ebft sends."""
    batch, size = [], 0
    for name, tensor in named:
        batch.append((name, tensor))
        size += nbytes(tensor)
        if size > buffer_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
