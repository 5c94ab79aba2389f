"""The sandbox: verdicts, limits, cleanup of runaway processes, no network, no inherited secrets."""

from __future__ import annotations

import builtins
import os
import socket
import sys
import tempfile
import threading
import time

import pytest

from ebft.evaluation import sandbox
from ebft.evaluation.sandbox import (
    RUNNER_PATH,
    UNPRIVILEGED_ID,
    Outcome,
    SandboxLimits,
    isolation_summary,
    run_program,
    run_programs,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

LIMITS = SandboxLimits(timeout_s=10, memory_bytes=512 * 1024**2)
SUMMARY = isolation_summary()
FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"


def sandbox_processes() -> list[int]:
    """Processes started by the sandbox (forked children keep the runner's command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if RUNNER_PATH.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def watch_peak(count, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], count())
        time.sleep(0.01)


def processes_of_uid(uid: int) -> int:
    total = 0
    for entry in os.listdir("/proc"):
        try:
            total += entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid
        except OSError:
            continue
    return total


@pytest.mark.parametrize(
    "source,outcome",
    [
        ("x = [1, 2]\nassert sum(x) == 3\nprint('ok')\n", Outcome.PASSED),
        ("assert 1 + 1 == 3, 'arithmetic'\n", Outcome.ASSERTION),
        ("def f(:\n    pass\n", Outcome.SYNTAX),
        ("{}['missing']\n", Outcome.RUNTIME),
        ("import sys\nsys.exit(0)\nassert False\n", Outcome.RUNTIME),  # exiting early is not passing
        ("import os\nos._exit(0)\n", Outcome.RUNTIME),
        ("import os\nos.abort()\n", Outcome.CRASHED),
    ],
)
def test_verdicts(source, outcome):
    result = run_program(source, LIMITS)
    assert result.outcome is outcome, result
    assert result.passed == (outcome is Outcome.PASSED)


def test_failure_reports_the_exception_and_a_traceback_tail():
    result = run_program("def f():\n    raise KeyError('needle')\nf()\n", LIMITS)
    assert result.outcome is Outcome.RUNTIME
    assert "KeyError" in result.detail and "needle" in result.detail
    assert "Traceback" in result.stderr and "line 2" in result.stderr


def test_infinite_loop_stops_at_the_wall_clock_limit():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.5))
    assert result.outcome is Outcome.TIMEOUT
    assert 1.5 <= time.monotonic() - start < 10
    assert sandbox_processes() == []


def test_cpu_time_limit_is_enforced_by_the_kernel():
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=20, cpu_time_s=1))
    assert result.outcome is Outcome.TIMEOUT
    assert "CPU" in result.detail
    assert result.duration_s < 15


def test_huge_allocation_is_a_memory_failure():
    result = run_program("block = bytearray(64 * 1024**3)\n", LIMITS)
    assert result.outcome is Outcome.MEMORY, result


def test_gradual_allocation_hits_the_address_space_limit():
    source = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024**2))\n"
    result = run_program(source, SandboxLimits(timeout_s=20, memory_bytes=256 * 1024**2))
    assert result.outcome is Outcome.MEMORY, result


def test_file_size_limit():
    source = "with open('big', 'wb') as f:\n    f.write(b'x' * (2 * 1024**2))\n"
    result = run_program(source, SandboxLimits(timeout_s=10, max_file_bytes=1024**2))
    assert result.outcome is Outcome.RUNTIME
    assert "File too large" in result.detail


def test_fork_is_refused_inside_the_interpreter():
    result = run_program("import os\nos.fork()\n", LIMITS)
    assert result.outcome is Outcome.FORBIDDEN
    result = run_program("import subprocess\nsubprocess.run(['true'])\n", LIMITS)
    assert result.outcome is Outcome.FORBIDDEN


@pytest.mark.skipif(SUMMARY["process_cap"] == "none", reason="no kernel process cap on this machine")
def test_fork_bomb_without_the_python_guard_is_capped_and_fully_killed():
    """The guard is off, so only the kernel mechanisms stand between the bomb and the machine."""
    max_processes = 8
    peak, stop = [0], threading.Event()
    watcher = threading.Thread(target=watch_peak, args=(lambda: len(sandbox_processes()), stop, peak))
    watcher.start()
    try:
        limits = SandboxLimits(timeout_s=2, python_guard=False, max_processes=max_processes)
        result = run_program(FORK_BOMB, limits)
    finally:
        stop.set()
        watcher.join()
    assert result.outcome is Outcome.TIMEOUT
    # The program and its forks, + the namespace's waiting PID 1, + the `unshare` wrapper.
    assert 2 <= peak[0] <= max_processes + 2
    assert sandbox_processes() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_root_drops_to_an_unprivileged_uid_whose_rlimit_caps_a_fork_bomb(monkeypatch):
    """Forces the uid-drop path (skipped automatically when the interpreter lives in a root-only
    directory) and switches the cgroup off, so RLIMIT_NPROC alone must cap the bomb."""
    monkeypatch.setattr(sandbox, "_interpreter_usable_unprivileged", lambda: True)
    limits = SandboxLimits(timeout_s=10, use_cgroup=False)
    assert isolation_summary(limits)["process_cap"] == "rlimit"
    source = f"import os\nassert (os.getuid(), os.getgid()) == ({UNPRIVILEGED_ID}, {UNPRIVILEGED_ID})\n"
    assert run_program(source, limits).outcome is Outcome.PASSED
    assert processes_of_uid(UNPRIVILEGED_ID) == 0  # nothing else of that uid would skew the count
    peak, stop = [0], threading.Event()
    watcher = threading.Thread(target=watch_peak, args=(lambda: processes_of_uid(UNPRIVILEGED_ID), stop, peak))
    watcher.start()
    try:
        bomb_limits = SandboxLimits(timeout_s=2, python_guard=False, use_cgroup=False, max_processes=6)
        result = run_program(FORK_BOMB, bomb_limits)
    finally:
        stop.set()
        watcher.join()
    assert result.outcome is Outcome.TIMEOUT
    assert 2 <= peak[0] <= 6
    assert processes_of_uid(UNPRIVILEGED_ID) == 0 and sandbox_processes() == []


def test_world_traversable_check():
    directory = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(directory, 0o755)
        assert sandbox._world_traversable(directory, readable=True)
        os.chmod(directory, 0o700)
        assert not sandbox._world_traversable(directory, readable=True)
    finally:
        os.rmdir(directory)


@pytest.mark.skipif(
    not (SUMMARY["network_and_pid_namespaces"] or SUMMARY["process_cap"] == "cgroup"),
    reason="neither a PID namespace nor a cgroup to find escaped processes",
)
def test_a_process_that_leaves_the_session_is_killed_too():
    source = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n"
    result = run_program(source, SandboxLimits(timeout_s=10, python_guard=False))
    assert result.outcome is Outcome.PASSED
    assert sandbox_processes() == []


@pytest.fixture
def listening_socket():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.3)
    yield server
    server.close()


def assert_nothing_connected(server):
    with pytest.raises(socket.timeout):
        server.accept()[0].close()


def connect_program(port: int) -> str:
    return (
        f"import socket\nconnection = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "connection.sendall(b'leak')\n"
    )


def test_socket_connection_is_refused(listening_socket):
    port = listening_socket.getsockname()[1]
    result = run_program(connect_program(port), LIMITS)
    assert result.outcome is Outcome.FORBIDDEN
    assert_nothing_connected(listening_socket)


@pytest.mark.skipif(not SUMMARY["network_and_pid_namespaces"], reason="no network namespace here")
def test_network_namespace_blocks_loopback_even_without_the_guard(listening_socket):
    port = listening_socket.getsockname()[1]
    result = run_program(connect_program(port), SandboxLimits(timeout_s=10, python_guard=False))
    assert result.outcome is Outcome.RUNTIME
    error_name = result.detail.split(":")[0]
    assert issubclass(getattr(builtins, error_name), OSError), result.detail  # e.g. unreachable
    assert_nothing_connected(listening_socket)


def test_environment_is_empty(monkeypatch):
    monkeypatch.setenv("EBFT_FAKE_SECRET", "hunter2")
    source = (
        "import os\n"
        "assert 'EBFT_FAKE_SECRET' not in os.environ\n"
        "with open('/proc/self/environ', 'rb') as f:\n"
        "    assert b'hunter2' not in f.read()\n"
        # Python itself may add LC_CTYPE (PEP 538 locale coercion); nothing else may be there.
        "assert set(os.environ) <= {'LC_CTYPE'}, sorted(os.environ)\n"
    )
    assert run_program(source, LIMITS).outcome is Outcome.PASSED


def test_each_run_gets_a_fresh_empty_working_directory():
    source = (
        "import os\n"
        "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
        f"assert os.path.realpath(os.getcwd()) != os.path.realpath({os.getcwd()!r})\n"
        "open('left_behind', 'w').write('x')\n"
    )
    first, second = run_programs([source, source], LIMITS, workers=1)
    assert first.outcome is Outcome.PASSED and second.outcome is Outcome.PASSED, (first, second)


def test_programs_run_isolated_from_the_calling_process():
    marker = "EBFT_SANDBOX_SIDE_EFFECT"
    run_program(f"import builtins\nbuiltins.{marker} = 1\n", LIMITS)
    assert not hasattr(builtins, marker)


def test_run_programs_keeps_input_order():
    sources = ["assert False\n", "pass\n", "def f(:\n", "raise ValueError\n", "pass\n"]
    outcomes = [r.outcome for r in run_programs(sources, LIMITS, workers=2)]
    assert outcomes == [Outcome.ASSERTION, Outcome.PASSED, Outcome.SYNTAX, Outcome.RUNTIME, Outcome.PASSED]
    assert run_programs([], LIMITS) == []
