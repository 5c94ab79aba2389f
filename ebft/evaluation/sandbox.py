"""Run untrusted, model-generated Python programs in a sandboxed subprocess.

Generated code never runs in the calling process. Each program gets its own interpreter
(`python -I`, an empty environment, stdin from /dev/null, a fresh temporary working directory)
and independent layers of protection:

* kernel resource limits set before the program starts: address space (RLIMIT_AS), CPU time,
  file size, open files, no core dumps, process count (RLIMIT_NPROC);
* a process cap that also holds for root: RLIMIT_NPROC does not apply to uid 0, so as root the
  program runs in its own `pids` cgroup (pids.max) when the cgroup tree is writable, and drops to
  an unprivileged uid (where RLIMIT_NPROC applies, and root-only files are unreadable) when the
  interpreter's files are readable by that uid;
* when `unshare` works, fresh network and PID namespaces: the only interface is a DOWN loopback
  (no connection reaches any address, 127.0.0.1 included), and when the namespace's first process
  dies the kernel kills every process left in it, even ones that left the process group;
* its own session: on exit or timeout the whole process group (and the cgroup) is killed;
* an in-process guard that disables fork/exec/subprocess/sockets/ctypes before the program runs,
  which turns the usual cases into a clear `forbidden` outcome. Python code can get around it;
  the kernel mechanisms above are the boundary. `isolation_summary()` says which are active.

The verdict comes back through a pipe, never from the program's output or exit status, in records
that carry a per-run nonce the program is not given (see _sandbox_runner.py): printing a pass
marker, exiting early with status 0, forking, or writing to the pipe cannot make a program pass.
Tests run in the program's own interpreter, so code that reads that interpreter's memory (frames,
the garbage collector, /proc/self/mem) or changes what the tests compare with (an object equal to
everything) can still pass them.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

# uid/gid the program runs as when started by root ("nobody" on Debian/Ubuntu).
UNPRIVILEGED_ID = 65534
# The script the sandboxed interpreter runs (limits, privilege drop, guard, verdict).
RUNNER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")
_CGROUP_PREFIX = "ebft-sandbox-"


class Outcome(str, enum.Enum):
    PASSED = "passed"
    SYNTAX = "syntax"  # the program does not compile
    ASSERTION = "assertion"  # a test assertion failed
    TIMEOUT = "timeout"  # wall-clock or CPU-time limit
    MEMORY = "memory"  # MemoryError (address-space limit) or killed for memory
    FORBIDDEN = "forbidden"  # tried fork/exec/subprocess/socket/ctypes
    RUNTIME = "runtime"  # any other exception, or exited before the tests finished
    CRASHED = "crashed"  # died from a signal without a verdict (segfault, abort, ...)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock, enforced by the parent
    cpu_time_s: int | None = None  # RLIMIT_CPU; default: the wall-clock limit rounded up, + 1 s
    memory_bytes: int = 2 * 1024**3  # RLIMIT_AS (virtual address space)
    max_file_bytes: int = 16 * 1024**2  # RLIMIT_FSIZE, also caps the captured stderr
    max_processes: int = 16  # processes + threads (pids.max, or RLIMIT_NPROC of the sandbox uid)
    max_open_files: int = 64
    stderr_chars: int = 2000  # tail of stderr kept in the result
    python_guard: bool = True  # disable fork/subprocess/socket/ctypes inside the interpreter
    isolate_namespaces: bool = True  # network + PID namespaces with `unshare`, when it works
    use_cgroup: bool = True  # pids cgroup, when running as root and the cgroup tree is writable

    @property
    def effective_cpu_time_s(self) -> int:
        return self.cpu_time_s if self.cpu_time_s is not None else math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class SandboxResult:
    outcome: Outcome
    detail: str  # one line: exception type and message, or why the program was stopped
    stderr: str  # last `stderr_chars` characters
    duration_s: float
    # With `tests`: each test's outcome, in order; tests not reached get the run's outcome.
    tests: tuple[Outcome, ...] = ()

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a property of the program under test)."""


@cache
def namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command that isolates network and PIDs here, or () when none works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    base = ("--net", "--pid", "--fork", "--kill-child")
    candidates = [(unshare, *base)] if os.geteuid() == 0 else []
    # Without root, a user namespace grants the rights to create the others.
    candidates.append((unshare, "--user", "--map-root-user", *base))
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "--", "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


@cache
def pids_cgroup_parent() -> str | None:
    """A cgroup directory in which this (root) process may create pids-limited cgroups, or None."""
    if os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            memberships = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    candidates = []
    for _, controllers, relative in memberships:
        for fields in mounts:
            separator = fields.index("-")
            fstype, super_options = fields[separator + 1], fields[-1].split(",")
            v1 = controllers and "pids" in controllers.split(",") and fstype == "cgroup" and "pids" in super_options
            v2 = not controllers and fstype == "cgroup2"
            mount_root, mount_point = fields[3], fields[4]
            if (v1 or v2) and relative.startswith(mount_root):
                inside_mount = relative[len(mount_root) :].lstrip("/")
                candidates.append(os.path.join(mount_point, inside_mount))
    for parent in candidates:
        probe = os.path.join(parent, f"{_CGROUP_PREFIX}probe-{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        usable = os.path.exists(os.path.join(probe, "pids.max"))
        os.rmdir(probe)
        if usable:
            return parent
    return None


def _world_traversable(path: str, readable: bool) -> bool:
    path = os.path.realpath(path)
    try:
        while True:
            mode = os.stat(path).st_mode
            if not mode & stat.S_IXOTH or (readable and not mode & stat.S_IROTH):
                return False
            if path == os.path.dirname(path):
                return True
            path, readable = os.path.dirname(path), False
    except OSError:
        return False


@cache
def _interpreter_usable_unprivileged() -> bool:
    """Whether the unprivileged uid can still import the standard library and installed
    packages after the drop (e.g. not when Python lives under /root)."""
    paths = sysconfig.get_paths()
    directories = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    directories.add(os.path.dirname(os.path.realpath(sys.executable)))
    return all(_world_traversable(d, readable=True) for d in directories if os.path.isdir(d))


def _drop_id(prefix: Sequence[str]) -> int:
    # Inside a user namespace only our own uid is mapped, so there is nothing to drop to.
    if os.geteuid() == 0 and "--user" not in prefix and _interpreter_usable_unprivileged():
        return UNPRIVILEGED_ID
    return -1


def isolation_summary(limits: SandboxLimits | None = None) -> dict[str, object]:
    """Which protection layers are active on this machine (logged before generated code runs)."""
    limits = limits or SandboxLimits()
    prefix = namespace_prefix() if limits.isolate_namespaces else ()
    cgroup = pids_cgroup_parent() if limits.use_cgroup else None
    drop_id = _drop_id(prefix)
    rlimit_caps_processes = os.geteuid() != 0 or drop_id >= 0 or "--user" in prefix
    return {
        "network_and_pid_namespaces": bool(prefix),
        "runs_as_uid": drop_id if drop_id >= 0 else os.geteuid(),
        "process_cap": "cgroup" if cgroup else ("rlimit" if rlimit_caps_processes else "none"),
        "python_guard": limits.python_guard,
    }


class _PidsCgroup:
    """A cgroup of its own for one run: caps the process count and finds every process to kill."""

    def __init__(self, parent: str, max_pids: int):
        self.path = os.path.join(parent, _CGROUP_PREFIX + uuid.uuid4().hex)
        os.mkdir(self.path)
        with open(os.path.join(self.path, "pids.max"), "w") as f:
            f.write(str(max_pids))
        self.procs_file = os.path.join(self.path, "cgroup.procs")

    def kill_all_and_remove(self, deadline_s: float = 5.0) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                with open(self.procs_file) as f:
                    pids = [int(pid) for pid in f.read().split()]
            except OSError:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(self.path)  # fails while a process (or an unreaped zombie) is inside
                return
            except OSError:
                time.sleep(0.01)


def _wait_for_exit_without_reaping(pid: int, timeout_s: float, records: _PipeReader) -> bool:
    """Wait until `pid` exits but leave it a zombie, so its process-group id stays reserved
    for the group kill that follows (no risk of signalling a recycled group). The records pipe is
    drained meanwhile, so a run with many tests never blocks on a full pipe."""
    deadline = time.monotonic() + timeout_s
    flags = os.WEXITED | os.WNOWAIT
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while os.waitid(os.P_PID, pid, flags | os.WNOHANG) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd, *records.watched()], [], [], remaining)
            else:
                time.sleep(min(0.01, remaining))
            records.read()
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _open_children(pid: int) -> list[int]:
    """pidfds of the children of `pid` (used for the namespace's PID 1 under `unshare`)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except OSError:
        return []
    pidfds = []
    for child in children:
        try:
            pidfds.append(os.pidfd_open(child))
        except OSError:
            pass
    return pidfds


class _PipeReader:
    """Collects what is written to the records pipe; reads never block. The records are written before
    the program exits, and a process that escaped every kill may still hold the write end, so the
    final read takes what is there and never waits for end-of-file."""

    def __init__(self, fd: int):
        self.fd, self.open = fd, True
        os.set_blocking(fd, False)
        self.chunks: list[bytes] = []

    def watched(self) -> list[int]:
        return [self.fd] if self.open else []

    def read(self) -> None:
        try:
            while self.open:
                chunk = os.read(self.fd, 65536)
                self.chunks.append(chunk)
                self.open = bool(chunk)  # end-of-file: every writer closed it
        except BlockingIOError:
            pass

    def text(self) -> str:
        self.read()
        return b"".join(self.chunks).decode("utf-8", "replace")


def _tail(path: str, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * chars))
        return f.read().decode("utf-8", "replace")[-chars:]


def _classify_without_verdict(returncode: int, stderr: str, in_pid_namespace: bool) -> tuple[Outcome, str]:
    if in_pid_namespace and returncode > 128:
        returncode = 128 - returncode  # the namespace's PID 1 reports a signal death as 128 + N
    if returncode < 0:
        signal_name = signal.Signals(-returncode).name
        if -returncode == signal.SIGXCPU:
            return Outcome.TIMEOUT, "killed by the CPU time limit"
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            return Outcome.MEMORY, f"killed by {signal_name} after a memory failure"
        if -returncode == signal.SIGKILL:
            # Our own kills are classified by the caller; this one came from the kernel.
            return Outcome.MEMORY, "killed by SIGKILL (out-of-memory killer or CPU hard limit)"
        return Outcome.CRASHED, f"killed by {signal_name}"
    if "MemoryError" in stderr:
        return Outcome.MEMORY, "MemoryError outside the program"
    if returncode == 0:
        return Outcome.RUNTIME, "the program exited before the tests finished"
    return Outcome.RUNTIME, f"exited with status {returncode} without a verdict"


@cache
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def _parse_records(text: str, nonce: str, num_tests: int) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    """(test records, verdict) of the runner's lines, each (outcome name, detail); None when any
    line lacks the nonce or is out of order: the program wrote to the pipe itself."""
    tests: list[tuple[str, str]] = []
    verdict = None
    lines = text.split("\n")
    if lines[-1]:  # a record is cut short only when a process wrote a partial line
        return None
    for line in lines[:-1]:
        fields = line.split(" ", 4)
        if fields[0] != nonce or verdict is not None:
            return None
        if fields[1:2] == ["verdict"] and len(fields) >= 3:
            verdict = (fields[2], " ".join(fields[3:]))
        elif fields[1:3] == ["test", str(len(tests))] and len(fields) == 5 and len(tests) < num_tests:
            tests.append((fields[3], fields[4]))
        else:
            return None
    return tests, verdict


def run_program(source: str, limits: SandboxLimits | None = None, tests: Sequence[str] | None = None) -> SandboxResult:
    """Run one Python program (e.g. solution + tests) in the sandbox and classify the result.

    The program passes when it runs to the end without raising; a failed `assert` gives
    `Outcome.ASSERTION`. With `tests`, each test (a piece of code) then runs in the program's
    globals, and the result gives every test's outcome; the run passes when all of them do.
    Raises SandboxError only when the sandbox itself cannot start."""
    limits = limits or SandboxLimits()
    prefix = namespace_prefix() if limits.isolate_namespaces else ()
    cgroup_parent = pids_cgroup_parent() if limits.use_cgroup else None
    drop_id = _drop_id(prefix)
    if cgroup_parent is None and drop_id < 0 and os.geteuid() == 0 and "--user" not in prefix:
        _warn_once(
            "sandbox: running as root without a writable pids cgroup or an interpreter the "
            "unprivileged uid can read: no kernel cap on the process count (the in-process "
            "guard and the wall-clock kill still apply)"
        )
    nonce = secrets.token_hex(16)
    run_dir = tempfile.mkdtemp(prefix="ebft-sandbox-")
    read_fd = write_fd = nonce_fd = -1
    cgroup = None
    try:
        work_dir = os.path.join(run_dir, "work")
        os.mkdir(work_dir, 0o700)
        program_path = os.path.join(work_dir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(source)
        tests_path = ""
        if tests is not None:
            tests_path = os.path.join(run_dir, "tests.json")  # read by the runner before the privilege drop
            with open(tests_path, "w", encoding="utf-8") as f:
                json.dump(list(tests), f)
        if drop_id >= 0:
            os.chmod(run_dir, 0o711)  # traversable for the unprivileged uid, not listable
            for path in (work_dir, program_path):
                os.chown(path, drop_id, drop_id)
        if cgroup_parent is not None:
            try:
                cgroup = _PidsCgroup(cgroup_parent, limits.max_processes + 1)  # + the PID-1 waiter
            except OSError as error:
                raise SandboxError(f"could not create a pids cgroup: {error}") from error
        read_fd, write_fd = os.pipe()
        nonce_fd, nonce_write_fd = os.pipe()
        os.write(nonce_write_fd, nonce.encode("ascii"))
        os.close(nonce_write_fd)
        config = {
            "program": program_path,
            "tests": tests_path,
            "result_fd": write_fd,
            "nonce_fd": nonce_fd,
            "memory": limits.memory_bytes,
            "cpu": limits.effective_cpu_time_s,
            "fsize": limits.max_file_bytes,
            "nproc": limits.max_processes,
            "nofile": limits.max_open_files,
            "drop_id": drop_id,
            "guard": limits.python_guard,
            "cgroup_procs": cgroup.procs_file if cgroup else "",
        }
        command = [*prefix, *(["--"] if prefix else []), sys.executable, "-I", RUNNER_PATH, json.dumps(config)]
        stderr_path = os.path.join(run_dir, "stderr")
        start = time.monotonic()
        with open(stderr_path, "wb") as stderr_file:
            try:
                process = subprocess.Popen(
                    command,
                    cwd=work_dir,
                    env={},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr_file,
                    pass_fds=(write_fd, nonce_fd),
                    start_new_session=True,
                )
            except OSError as error:
                raise SandboxError(f"could not start the sandboxed interpreter: {error}") from error
        for fd in (write_fd, nonce_fd):
            os.close(fd)
        write_fd = nonce_fd = -1
        records_pipe = _PipeReader(read_fd)
        try:
            finished = _wait_for_exit_without_reaping(process.pid, limits.timeout_s, records_pipe)
        finally:
            # Kill whatever the program left behind (or the program itself on timeout), then reap.
            # The namespace's PID 1 exits only after every process in the namespace is gone.
            namespace_init = _open_children(process.pid) if prefix else []
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            for pidfd in namespace_init:
                select.select([pidfd], [], [], 5.0)
                os.close(pidfd)
            if cgroup is not None:  # also finds processes that left the group
                cgroup.kill_all_and_remove()
                cgroup = None
        duration = time.monotonic() - start
        records = records_pipe.text()
        stderr = _tail(stderr_path, limits.stderr_chars)
    finally:
        if cgroup is not None:
            cgroup.kill_all_and_remove()
        for fd in (read_fd, write_fd, nonce_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(run_dir, ignore_errors=True)

    num_tests = 0 if tests is None else len(tests)
    parsed = _parse_records(records, nonce, num_tests)
    test_records, verdict = parsed if parsed is not None else ([], None)
    if verdict is not None and verdict[0] == "sandbox_error":
        raise SandboxError(f"the sandbox could not set up: {verdict[1]}\n{stderr}")
    if not finished:
        outcome, detail = Outcome.TIMEOUT, f"wall-clock limit of {limits.timeout_s:g} s exceeded"
    elif parsed is None:
        outcome, detail = Outcome.RUNTIME, "the program wrote to the verdict pipe"
    elif verdict is not None and verdict[0] in Outcome._value2member_map_:
        outcome, detail = Outcome(verdict[0]), verdict[1]
    else:
        outcome, detail = _classify_without_verdict(process.returncode, stderr, bool(prefix))
    test_outcomes = [
        Outcome(name) if name in Outcome._value2member_map_ else Outcome.RUNTIME for name, _ in test_records
    ]
    test_outcomes += [outcome] * (num_tests - len(test_outcomes))
    return SandboxResult(outcome, detail, stderr, duration, tuple(test_outcomes))


def run_programs(
    sources: Sequence[str],
    limits: SandboxLimits | None = None,
    workers: int = 2,
    tests: Sequence[Sequence[str]] | None = None,
) -> list[SandboxResult]:
    """Run many programs, at most `workers` at a time; results are in input order. `tests`, when
    given, holds each program's tests (see run_program).

    Threads are enough for the pool: each one only waits on its own subprocess."""
    if not sources:
        return []
    if tests is not None and len(tests) != len(sources):
        raise ValueError(f"{len(tests)} test lists for {len(sources)} programs")
    jobs = list(zip(sources, tests if tests is not None else [None] * len(sources)))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources)))) as pool:
        return list(pool.map(lambda job: run_program(job[0], limits, job[1]), jobs))
