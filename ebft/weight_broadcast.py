"""The broadcast weight transfer that both ends share: the learner's rank 0 sends, every rollout engine's workers
receive (ebft/learner/broadcast_sender.py and ebft/actors/transfer_engines.py, which never import each other).

A transfer group is vLLM's rendezvous (`StatelessProcessGroup`: a TCP store served by rank 0) plus a communicator:
NCCL between GPUs (vLLM's `PyNcclCommunicator`), gloo between CPU processes. Tensors travel packed, in uint8
buffers of at most `buffer_bytes` (plus the one tensor that crosses the bound), cut exactly as vLLM's packed NCCL
consumer cuts them.

Both communicators fail the way NCCL fails: a broadcast whose peer died or stopped never completes, raises nothing,
and nothing outside the waiting process can end it; only the process's own abort does, and an aborted broadcast
looks complete (its buffer holds whatever arrived). The CPU one is gloo made to behave so (`CpuCommunicator`), so
the tests run the failure paths a GPU run has. Nothing can hang all the same, by construction:

- every wait of a receiver (a connect, a whole round) runs under a `Guard`, a thread of the waiting process that
  ends that process once the wait passes its bound, once the round is declared failed in the group's store, or
  when the wait raises: its rollout actor dies with it and is replaced. A receiver never loads a round that did not
  complete, because it does not outlive one;
- rank 0 polls its own broadcasts' completion, the receivers' announcements and acknowledgments against one
  deadline per push; on a failure it declares the round failed in the store and aborts its communicator (its own
  process, so the abort works). Its communicator's set-up, which it cannot poll, runs under a Guard too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger(__name__)

POLL_S = 0.005
GUARD_POLL_S = 0.05
GUARD_EXIT_CODE = 75
"""What a process that a Guard ended exits with (EX_TEMPFAIL): replace it and try again."""
NEVER = timedelta(days=365)
"""gloo's own timeout, so that only the guards bound a wait, as with NCCL."""

_abandoned: list[Any] = []
"""Aborted gloo groups: a ProcessGroupGloo's destructor joins its threads, which wait for a dead peer."""


def entered_key(round_index: int, rank: int) -> str:
    return f"ebft/entered/{round_index}/{rank}"


def failed_key(round_index: int) -> str:
    return f"ebft/failed/{round_index}"


class Guard:
    """A bound on a wait that nothing outside this process could end: past `timeout_s`, or once `failed()` says so,
    or when the guarded block raises, the process ends (os._exit) and its actor is replaced.

    The check runs on a thread of its own: the waiting thread may sit in a C call (NCCL, a store) that never returns.
    """

    def __init__(self, what: str, timeout_s: float, failed: Callable[[], bool] = lambda: False) -> None:
        self.what, self.timeout_s, self.failed = what, timeout_s, failed
        self._left = threading.Event()

    def __enter__(self) -> Guard:
        deadline = time.monotonic() + self.timeout_s
        threading.Thread(target=self._watch, args=(deadline,), name="ebft-transfer-guard", daemon=True).start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self._end(f"{self.what} failed: {error!r}")
        self._left.set()

    def _watch(self, deadline: float) -> None:
        while not self._left.wait(GUARD_POLL_S):
            if time.monotonic() > deadline:
                self._end(f"{self.what} did not complete within {self.timeout_s:g} s")
            try:
                failed = self.failed()
            except Exception as error:  # the store went with rank 0
                self._end(f"{self.what}: the transfer group's store is gone ({error!r})")
            if failed:
                self._end(f"{self.what} was declared failed by another member of the transfer group")

    def _end(self, reason: str) -> None:
        if self._left.is_set():
            return
        # Straight to the file descriptor: a logging handler's lock may be held by the thread that hangs.
        os.write(2, f"ebft: {reason}; ending this process (pid {os.getpid()}) so that it is replaced\n".encode())
        os._exit(GUARD_EXIT_CODE)


class CpuCommunicator:
    """gloo between CPU processes, with NCCL's failure semantics: a broadcast whose peer died or stopped is never
    complete (gloo would raise or time out), and only `abort` in this process ends it."""

    def __init__(self, store, rank: int, world_size: int) -> None:
        self.group = torch.distributed.ProcessGroupGloo(store, rank, world_size, NEVER)
        self.aborted = False
        self.last = None  # the last broadcast's gloo work

    def start_broadcast(self, tensor: torch.Tensor) -> Callable[[], bool]:
        options = torch.distributed.BroadcastOptions()
        options.rootRank = 0
        work = self.last = self.group.broadcast([tensor], options)
        return lambda: self.aborted or (work.is_completed() and work.is_success())

    def abort(self) -> None:
        self.aborted = True
        if self.last is not None and not self.last.is_completed():
            _abandoned.append(self.group)  # its destructor would wait for the peer that never comes
        self.group = self.last = None


class NcclCommunicator:
    """vLLM's PyNcclCommunicator; a broadcast is complete when a CUDA event recorded after it is."""

    def __init__(self, rendezvous, device: torch.device) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.utils.nccl import unpinned_nccl_env

        stream = torch.cuda.current_stream(device)
        with unpinned_nccl_env():
            self.nccl = PyNcclCommunicator(rendezvous, device=device)
        # Its warm-up makes a stream of vLLM's the thread's current one: the learner would train on it afterwards.
        torch.cuda.set_stream(stream)
        if self.nccl.disabled:
            raise RuntimeError(
                "vLLM's NCCL communicator disabled itself (NCCL did not load, or VLLM_DISABLE_PYNCCL is set): "
                "install NCCL with the CUDA build of vLLM, or set rollout.weight_transport=object_store"
            )

    def start_broadcast(self, tensor: torch.Tensor) -> Callable[[], bool]:
        stream = torch.cuda.current_stream(tensor.device)
        self.nccl.broadcast(tensor, src=0, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        return done.query

    def abort(self) -> None:
        self.nccl.destroy()  # ncclCommAbort: this process's kernels waiting for a peer end


@dataclass
class TransferGroup:
    """One member of a transfer group (rank 0 sends, the others receive)."""

    rank: int
    world_size: int
    store: Any  # torch.distributed.Store served by rank 0
    communicator: CpuCommunicator | NcclCommunicator | None
    timeout_s: float
    watcher: Any = None
    """A second client of the store, for the guards: the waiting thread may be inside a call on the first."""

    def start_broadcast(self, tensor: torch.Tensor) -> Callable[[], bool]:
        if self.communicator is None:
            raise RuntimeError("the transfer group was closed")
        return self.communicator.start_broadcast(tensor)

    def entered(self, round_index: int, rank: int) -> bool:
        return self.store.check([entered_key(round_index, rank)])

    def announce_entered(self, round_index: int) -> None:
        self.store.set(entered_key(round_index, self.rank), b"1")

    def declare_failed(self, round_index: int) -> None:
        """Rank 0: every receiver still inside the round ends itself (their broadcasts never complete)."""
        try:
            self.store.set(failed_key(round_index), b"1")
        except Exception as error:  # nothing reads it then: the guards' deadlines end the receivers
            log.warning("could not declare round %d failed in the transfer group's store: %r", round_index, error)

    def guard_round(self, round_index: int) -> Guard:
        """A receiver's bound on one whole round (ends the process: see Guard)."""
        return Guard(
            f"weight push round {round_index}", self.timeout_s, lambda: self.watcher.check([failed_key(round_index)])
        )

    def close(self) -> None:
        communicator, self.communicator = self.communicator, None
        if communicator is not None:
            communicator.abort()


def open_transfer_group(
    backend: str, host: str, port: int, rank: int, world_size: int, device: torch.device, timeout_s: float
) -> TransferGroup:
    """Join the group (rank 0 serves the store). Rank 0's rendezvous waits for every member to connect and raises
    past `timeout_s`, so the sender can name who did not join; everything else (a receiver's rendezvous, NCCL's
    set-up and warm-up, which have no bound of their own) runs under a Guard: past the bound the process ends."""
    from vllm.distributed.utils import StatelessProcessGroup

    if backend not in ("nccl", "gloo"):  # before the Guard, which would end the process for a bad argument
        raise ValueError(f"unknown transfer backend {backend!r}: nccl or gloo")

    def rendezvous():
        return StatelessProcessGroup.create(host, port, rank, world_size, store_timeout=max(1, int(timeout_s)))

    joined = rendezvous() if rank == 0 else None
    with Guard(f"joining the weight-transfer group as rank {rank} of {world_size}", timeout_s):
        joined = joined or rendezvous()
        if backend == "nccl":
            communicator = NcclCommunicator(joined, device)
        else:
            communicator = CpuCommunicator(torch.distributed.PrefixStore("ebft/gloo/", joined.store), rank, world_size)
        # The same warm-up on both backends: every member's communicator works before the group is used.
        wait_complete(communicator.start_broadcast(torch.zeros(1, dtype=torch.uint8, device=device)))
        watcher = joined.store.clone()
    return TransferGroup(rank, world_size, joined.store, communicator, timeout_s, watcher)


def wait_complete(done: Callable[[], bool]) -> None:
    """A receiver's wait for one broadcast: no bound of its own (the round's Guard is its bound)."""
    while not done():
        time.sleep(POLL_S)


def send_packed(
    named: Iterable[tuple[str, torch.Tensor]],
    group: TransferGroup,
    buffer_bytes: int,
    wait: Callable[[Callable[[], bool]], None],
) -> None:
    """Rank 0: broadcast the tensors packed in buffers, each packed on the current stream only after `wait` saw the
    previous one complete (so a tensor copied there, e.g. gathered under ZeRO-3, is complete when packed, and at
    most one buffer of copies is alive)."""
    for batch in packed_batches(named, buffer_bytes):
        wait(group.start_broadcast(pack(batch)))


def receive_packed(
    metadata: Iterable[tuple[str, list[int], torch.dtype]],
    group: TransferGroup,
    buffer_bytes: int,
    device: torch.device,
    load: Callable[[list[tuple[str, torch.Tensor]]], Any],
) -> None:
    """A receiver: the buffers rank 0 sends, cut the same way, each unpacked and handed to `load`."""
    announced = ((name, torch.empty(shape, dtype=dtype, device="meta")) for name, shape, dtype in metadata)
    for batch in packed_batches(announced, buffer_bytes):
        packed = torch.empty(sum(nbytes(t) for _, t in batch), dtype=torch.uint8, device=device)
        wait_complete(group.start_broadcast(packed))
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
    vLLM's packed NCCL consumer makes."""
    batch, size = [], 0
    for name, tensor in named:
        batch.append((name, tensor))
        size += nbytes(tensor)
        if size > buffer_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def pack(batch: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([tensor.contiguous().view(-1).view(torch.uint8) for _, tensor in batch])


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
