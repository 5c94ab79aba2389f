"""NCCL's failure semantics on CPU, and the guards that keep a push from hanging on them (ebft/weight_broadcast.py).

NCCL's broadcast never times out: a peer that died blocks its partner for good, nothing raises, and only an abort
from the waiting process ends the wait. The CPU communicator must behave so, or the CPU tests would not exercise the
failure paths of a GPU run; the Guard must end its process in every way a wait can go wrong, and only then.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import torch

from ebft.learner.deepspeed_setup import free_port
from ebft.weight_broadcast import GUARD_EXIT_CODE, CpuCommunicator

STILL_WAITING_S = 4.0


def start_peer(port: int, rank: int, script: str) -> subprocess.Popen:
    """A process that joins the group on `port` as `rank` (the test process serves the store) and runs `script`."""
    code = textwrap.dedent(
        f"""
        import sys, time, datetime, torch
        from ebft.weight_broadcast import CpuCommunicator
        store = torch.distributed.TCPStore("127.0.0.1", {port}, 2, False, timeout=datetime.timedelta(seconds=60))
        communicator = CpuCommunicator(store, {rank}, 2)
        """
    )
    return subprocess.Popen([sys.executable, "-c", code + textwrap.dedent(script)], stdout=subprocess.PIPE, text=True)


def serve_store(port: int):
    return torch.distributed.TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=60), wait_for_workers=False)


def wait_done(done, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.01)
    return False


def test_a_broadcast_to_a_receiver_that_died_never_completes_and_only_the_senders_abort_ends_it():
    port = free_port()
    store = serve_store(port)
    receiver = start_peer(
        port,
        1,
        """
        buffer = torch.zeros(4)
        done = communicator.start_broadcast(buffer)
        while not done():
            time.sleep(0.01)
        print(buffer.tolist(), flush=True)
        time.sleep(600)
        """,
    )
    try:
        sender = CpuCommunicator(store, 0, 2)
        payload = torch.tensor([1.0, 2.0, 3.0, 4.0])
        assert wait_done(sender.start_broadcast(payload), 30)
        assert receiver.stdout.readline().strip() == str(payload.tolist())  # the group works
        receiver.kill()
        receiver.wait()
        done = sender.start_broadcast(torch.ones(1 << 20))  # larger than any socket buffer
        assert not wait_done(done, STILL_WAITING_S), "a broadcast to a dead receiver completed"
        sender.abort()
        assert done(), "an aborted broadcast must look complete, as NCCL's does"
    finally:
        receiver.kill()


def test_a_receiver_whose_sender_died_waits_for_good_raising_nothing():
    port = free_port()
    store = serve_store(port)
    sender = start_peer(port, 0, "time.sleep(600)")
    try:
        receiver = CpuCommunicator(torch.distributed.TCPStore("127.0.0.1", port, 2, False), 1, 2)
        done = receiver.start_broadcast(torch.zeros(4))
        time.sleep(0.5)
        sender.kill()
        sender.wait()
        assert not wait_done(done, STILL_WAITING_S), "a receive from a dead sender completed (or raised)"
    finally:
        sender.kill()
        del store


def run_guarded(body: str, timeout_s: float, failed: str = "lambda: False", after: str = "") -> tuple[int, float]:
    """A process that runs `body` under a Guard, then `after`; its exit code and how long it ran."""
    code = (
        textwrap.dedent(
            f"""
        import os, time
        from ebft.weight_broadcast import Guard
        with Guard("a test wait", {timeout_s}, {failed}):
        """
        )
        + textwrap.indent(textwrap.dedent(body), "    ")
        + f"\n{after}\n"
    )
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return completed.returncode, time.monotonic() - started


def test_a_guard_ends_its_process_past_its_bound_even_while_the_wait_never_returns():
    code, _ = run_guarded("time.sleep(600)", 1.0)
    assert code == GUARD_EXIT_CODE


def test_a_guard_ends_its_process_when_the_round_is_declared_failed():
    flag = f"/tmp/ebft-guard-{os.getpid()}"
    code, seconds = run_guarded(
        f"open({flag!r}, 'w').close(); time.sleep(600)", 300.0, f"lambda: os.path.exists({flag!r})"
    )
    os.unlink(flag)
    assert code == GUARD_EXIT_CODE and seconds < 60


def test_a_guard_ends_its_process_when_the_wait_raises():
    code, _ = run_guarded("raise RuntimeError('lost the peer')", 300.0)
    assert code == GUARD_EXIT_CODE


def test_a_guarded_wait_that_completes_leaves_the_process_alone():
    # The process lives on past the bound: a guard still armed after the wait completed would end it.
    code, seconds = run_guarded("time.sleep(0.3)", 1.5, after="time.sleep(3)")
    assert code == 0 and seconds >= 3
