"""Runs inside the sandboxed interpreter as `python -I _sandbox_runner.py CONFIG_JSON`.

Never imported by the package: `sandbox.run_program` starts it in a fresh subprocess. It joins
the run's cgroup, sets the resource limits, drops privileges, disables fork/exec/sockets, runs the
program and writes the verdict (outcome, newline, one-line detail) to the pipe descriptor named in
the config. Everything it needs is imported before the privilege drop and the guard, and the
program runs in globals of its own.
"""

import json
import os
import resource
import signal
import sys
import traceback

CONFIG = json.loads(sys.argv[1])
_write, _exit, _format_exc = os.write, os._exit, traceback.format_exc

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


def report(outcome, detail):
    _write(CONFIG["result_fd"], (outcome + "\n" + detail.replace("\n", " ")[:500]).encode("utf-8", "replace"))


def on_cpu_limit(signum, frame):
    report("timeout", "CPU time limit exceeded")
    _exit(124)


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


def set_up():
    """Everything before the program runs; returns the program's source."""
    if CONFIG["cgroup_procs"]:
        with open(CONFIG["cgroup_procs"], "w") as f:
            f.write(str(os.getpid()))
    if os.getpid() == 1:
        become_child_of_namespace_init()
    signal.signal(signal.SIGXCPU, on_cpu_limit)
    with open(CONFIG["program"], encoding="utf-8") as f:
        source = f.read()
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
    return source


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


def main():
    try:
        source = set_up()
    except BaseException as error:
        traceback.print_exc()
        report("sandbox_error", f"{type(error).__name__}: {error}")
        _exit(1)
    try:
        code = compile(source, CONFIG["program"], "exec")
        exec(code, {"__name__": "__sandbox__", "__builtins__": __builtins__})
    except BaseException as error:
        outcome, detail = outcome_of(error), f"{type(error).__name__}: {error}"
        if isinstance(error, SystemExit):
            detail = f"the program called exit({error.code!r}) before the tests finished"
        try:
            sys.stderr.write(_format_exc())
            sys.stderr.flush()
        except BaseException:
            pass
        report(outcome, detail)
        _exit(1)
    report("passed", "")
    _exit(0)


if __name__ == "__main__":
    main()
