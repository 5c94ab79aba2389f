"""Runs inside the sandboxed interpreter as `python -I _sandbox_runner.py CONFIG_JSON`.

Never imported by the package: `sandbox.run_program` starts it in a fresh subprocess. It joins
the run's cgroup, sets the resource limits, drops privileges, disables fork/exec/sockets, runs the
program (then each test, when the config names a tests file) and writes one record per line to the
pipe descriptor named in the config: `NONCE test INDEX OUTCOME DETAIL` per test, then
`NONCE verdict OUTCOME DETAIL`. The nonce comes through a second pipe that is read and closed
before the program starts, so it is in no file, argument, environment variable or descriptor the
program can read, and lines the program writes to the result pipe itself are recognised as forged.
Only the process that started the program writes records (a forked child that returns into this
script writes none). Everything it needs is imported before the privilege drop and the guard, the
functions used after the program runs are bound before it can replace them, and the program runs
in globals of its own.
"""

import json
import os
import resource
import signal
import sys
import traceback

CONFIG = json.loads(sys.argv[1])
_write, _exit, _format_exc, _getpid = os.write, os._exit, traceback.format_exc, os.getpid
_compile, _exec, _str, _BaseException, _SystemExit = compile, exec, str, BaseException, SystemExit

FORBIDDEN_OS_FUNCTIONS = (
    "fork",
    "forkpty",
    "vfork",
    "system",
    "popen",
    "execv",
    "execve",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "execvp",
    "execvpe",
    "spawnv",
    "spawnve",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "spawnvp",
    "spawnvpe",
    "posix_spawn",
    "posix_spawnp",
    "setsid",
    "setpgid",
    "setpgrp",
    "kill",
    "killpg",
    "putenv",
    "unsetenv",
)
FORBIDDEN_SUBPROCESS_FUNCTIONS = (
    "Popen",
    "call",
    "run",
    "check_call",
    "check_output",
    "getoutput",
    "getstatusoutput",
)
FORBIDDEN_SOCKET_FUNCTIONS = ("socket", "socketpair", "fromfd", "create_connection", "create_server")
BLOCKED_MODULES = ("ctypes", "_ctypes", "_posixsubprocess", "pty")


class SandboxViolation(PermissionError):
    pass


def forbidden(*args, **kwargs):
    raise SandboxViolation("disabled in the sandbox")


def read_nonce():
    fd = CONFIG["nonce_fd"]
    nonce = os.read(fd, 256).decode("ascii")
    os.close(fd)
    return nonce


class Reporter:
    """Writes records with the nonce, from the process that runs the program only. Kept in main's frame,
    not in module globals, where `import __main__` would find it."""

    def __init__(self, nonce):
        self._nonce, self._owner = nonce, None

    def start_program(self):
        self._owner = _getpid()

    def record(self, kind, outcome, detail):
        if self._owner is not None and _getpid() != self._owner:
            _exit(1)
        line = self._nonce + " " + kind + " " + outcome + " " + detail.replace("\n", " ")[:500] + "\n"
        _write(CONFIG["result_fd"], line.encode("utf-8", "replace"))


def on_cpu_limit_of(reporter):
    def on_cpu_limit(signum, frame):
        reporter.record("verdict", "timeout", "CPU time limit exceeded")
        _exit(124)

    return on_cpu_limit


def set_limit(limit, soft, hard):
    current_hard = resource.getrlimit(limit)[1]
    if current_hard != resource.RLIM_INFINITY:  # an unprivileged process cannot raise it
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(limit, (soft, hard))


def become_child_of_namespace_init():
    # PID 1 of a namespace ignores signals it has no handler for (even abort() or a raised
    # SIGSEGV), so the program runs as its child; PID 1 only waits and passes the status on.
    child = os.fork()
    if child:
        status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        _exit(status if status >= 0 else 128 - status)


def install_guard(modules):
    posix, subprocess, posixsubprocess, socket, _socket, multiprocessing = modules
    for module in (os, posix):
        for name in FORBIDDEN_OS_FUNCTIONS:
            if hasattr(module, name):
                setattr(module, name, forbidden)
    for name in FORBIDDEN_SUBPROCESS_FUNCTIONS:
        setattr(subprocess, name, forbidden)
    posixsubprocess.fork_exec = forbidden
    for module in (socket, _socket):
        for name in FORBIDDEN_SOCKET_FUNCTIONS:
            if hasattr(module, name):
                setattr(module, name, forbidden)
    multiprocessing.Process.start = forbidden
    for name in BLOCKED_MODULES:
        sys.modules[name] = None  # a later `import` raises ImportError


def set_up(reporter):
    """Everything before the program runs; returns the program's source and its tests (or None)."""
    if CONFIG["cgroup_procs"]:
        with open(CONFIG["cgroup_procs"], "w") as f:
            f.write(str(os.getpid()))
    if os.getpid() == 1:
        become_child_of_namespace_init()
    signal.signal(signal.SIGXCPU, on_cpu_limit_of(reporter))
    with open(CONFIG["program"], encoding="utf-8") as f:
        source = f.read()
    tests = None
    if CONFIG["tests"]:
        with open(CONFIG["tests"], encoding="utf-8") as f:
            tests = json.load(f)
    guarded_modules = None
    if CONFIG["guard"]:  # import before the privilege drop, which may make them unreadable
        import _posixsubprocess
        import _socket
        import multiprocessing
        import posix
        import socket
        import subprocess

        guarded_modules = (posix, subprocess, _posixsubprocess, socket, _socket, multiprocessing)
    for limit, value in (
        (resource.RLIMIT_AS, CONFIG["memory"]),
        (resource.RLIMIT_FSIZE, CONFIG["fsize"]),
        (resource.RLIMIT_NOFILE, CONFIG["nofile"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, CONFIG["nproc"]),
    ):
        set_limit(limit, value, value)
    set_limit(resource.RLIMIT_CPU, CONFIG["cpu"], CONFIG["cpu"] + 1)  # SIGXCPU, then SIGKILL
    if CONFIG["drop_id"] >= 0:
        os.setgroups([])
        os.setgid(CONFIG["drop_id"])
        os.setuid(CONFIG["drop_id"])
    if guarded_modules:
        install_guard(guarded_modules)
    return source, tests


def outcome_of(error):
    for kind, outcome in (
        (SyntaxError, "syntax"),
        (AssertionError, "assertion"),
        (MemoryError, "memory"),
        (SandboxViolation, "forbidden"),
    ):
        if isinstance(error, kind):
            return outcome
    return "runtime"


def run_code(source, filename, program_globals):
    """None when the code runs to the end, else (outcome, detail) of what it raised."""
    try:
        _exec(_compile(source, filename, "exec"), program_globals)
        return None
    except _BaseException as error:
        outcome, detail = outcome_of(error), f"{type(error).__name__}: {error}"
        if isinstance(error, _SystemExit):
            detail = f"the program called exit({error.code!r}) before the tests finished"
        try:
            sys.stderr.write(_format_exc())
            sys.stderr.flush()
        except _BaseException:
            pass
        return outcome, detail


def main():
    reporter = Reporter(read_nonce())
    try:
        source, tests = set_up(reporter)
    except BaseException as error:
        traceback.print_exc()
        reporter.record("verdict", "sandbox_error", f"{type(error).__name__}: {error}")
        _exit(1)
    reporter.start_program()
    program_globals = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    failure = run_code(source, CONFIG["program"], program_globals)
    if tests is not None:
        # A program that does not load fails every test; otherwise each test runs in its globals.
        index, first_failure = 0, failure
        for test in tests:
            result = failure or run_code(test, "<test " + _str(index) + ">", program_globals)
            reporter.record("test " + _str(index), *(result or ("passed", "")))
            first_failure = first_failure or result
            index = index + 1
        failure = first_failure
    if failure:
        reporter.record("verdict", *failure)
        _exit(1)
    reporter.record("verdict", "passed", "")
    _exit(0)


if __name__ == "__main__":
    main()
