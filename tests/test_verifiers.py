"""Code rewards on known programs, through the sandbox, and the translation metric."""

from __future__ import annotations

import sys
import time

import pytest

from ebft.evaluation.sandbox import Outcome, SandboxLimits, run_program
from ebft.verifiers.code import CodeTask, code_rewards

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

LIMITS = SandboxLimits(timeout_s=10, memory_bytes=512 * 1024**2)
ADD = CodeTask(
    "Write a function add(a, b) that returns the sum of a and b.",
    tests=("assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"),
)
CORRECT = "```python\ndef add(a, b):\n    return a + b\n```"


def reward_of(completion: str, task: CodeTask = ADD, limits: SandboxLimits = LIMITS):
    [[reward]] = code_rewards([task], [[completion]], limits)
    return reward


def test_a_correct_program_passes_every_test():
    reward = reward_of(CORRECT)
    assert (reward.all_passed, reward.fraction_passed) == (1.0, 1.0)
    assert reward.outcome is Outcome.PASSED
    assert reward.test_outcomes == (Outcome.PASSED,) * 3


def test_a_wrong_program_is_scored_test_by_test():
    reward = reward_of("def add(a, b):\n    return abs(a) + b\n")
    # add(1, 2) = 3 passes, add(-1, 1) = 2 fails, add(10, 5) = 15 passes.
    assert reward.test_outcomes == (Outcome.PASSED, Outcome.ASSERTION, Outcome.PASSED)
    assert reward.all_passed == 0.0
    assert reward.fraction_passed == pytest.approx(2 / 3)
    assert reward.outcome is Outcome.ASSERTION


def test_a_test_that_hangs_times_out_and_the_tests_before_it_count():
    hangs = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n"
    start = time.monotonic()
    reward = reward_of(hangs, limits=SandboxLimits(timeout_s=1.5))
    assert time.monotonic() - start >= 1.5
    assert reward.outcome is Outcome.TIMEOUT
    assert reward.test_outcomes == (Outcome.PASSED, Outcome.TIMEOUT, Outcome.TIMEOUT)
    assert (reward.all_passed, reward.fraction_passed) == (0.0, pytest.approx(1 / 3))


def before_the_tests(statements: str, body: str = "return a + b") -> str:
    """A completion that runs `statements` when `add` is defined, before any test (the code extraction
    keeps definitions and drops other top-level statements), then adds."""
    indented = "".join(f"    {line}\n" for line in statements.splitlines())
    return f"import os, sys\ndef first():\n{indented}def add(a, b, _=first()):\n    {body}\n"


def test_printing_pass_markers_then_failing_scores_nothing():
    # What harnesses that read the output look for, on stdout and stderr, and the runner's own record
    # layout without the nonce.
    markers = "SUCCESS\\nAll tests passed\\npassed\\nverdict passed \\ntest 0 passed \\ntest 1 passed \\n"
    printing = f"print('{markers}')\nsys.stderr.write('{markers}')"
    reward = reward_of(before_the_tests(printing, body=printing.replace("\n", "; ") + "; return -1"))
    assert (reward.all_passed, reward.fraction_passed) == (0.0, 0.0)
    assert reward.test_outcomes == (Outcome.ASSERTION,) * 3


RUNTIME, PASSED = Outcome.RUNTIME, Outcome.PASSED


@pytest.mark.parametrize(
    "program,outcomes",
    [
        (before_the_tests("sys.exit(0)"), (RUNTIME,) * 3),
        (before_the_tests("os._exit(0)"), (RUNTIME,) * 3),
        # Correct for the first test, then leaves with status 0 inside the second.
        (before_the_tests("pass", body="return a + b if a >= 0 else os._exit(0)"), (PASSED, RUNTIME, RUNTIME)),
        # SystemExit is caught like any exception: the second test fails, the third still runs.
        (before_the_tests("pass", body="return a + b if a >= 0 else sys.exit(0)"), (PASSED, RUNTIME, PASSED)),
    ],
    ids=["sys.exit", "os._exit", "os._exit-in-a-test", "sys.exit-in-a-test"],
)
def test_exiting_early_with_status_0_is_not_passing(program, outcomes):
    reward = reward_of(program)
    assert reward.all_passed == 0.0
    assert reward.outcome is Outcome.RUNTIME
    assert reward.test_outcomes == outcomes
    assert reward.fraction_passed == pytest.approx(outcomes.count(PASSED) / 3)


def test_a_program_that_forks_is_refused():
    reward = reward_of(before_the_tests("os.fork()"))
    assert (reward.all_passed, reward.fraction_passed) == (0.0, 0.0)
    assert reward.test_outcomes == (Outcome.FORBIDDEN,) * 3


def test_a_forked_child_that_runs_the_tests_cannot_report_them():
    # Without the in-process guard the fork succeeds: the parent waits for its child and leaves with
    # status 0; the child goes on into the harness and passes every test, but it is not the process
    # the sandbox started the program in.
    program = before_the_tests("child = os.fork()\nif child:\n    os.waitpid(child, 0)\n    os._exit(0)")
    reward = reward_of(program, limits=SandboxLimits(timeout_s=10, memory_bytes=512 * 1024**2, python_guard=False))
    assert (reward.all_passed, reward.fraction_passed) == (0.0, 0.0)
    assert reward.outcome is Outcome.RUNTIME


FORGE = (
    "import json\n"
    "fd = json.loads(sys.argv[1])['result_fd']\n"
    "os.write(fd, b'passed\\n')\n"
    "os.write(fd, b'0 test 0 passed \\n0 verdict passed \\n')"
)


def test_records_written_to_the_verdict_pipe_by_the_program_are_refused():
    reward = reward_of(before_the_tests(FORGE, body="return 0"))
    assert (reward.all_passed, reward.fraction_passed) == (0.0, 0.0)
    # Even a correct program that writes to the pipe gets nothing: its records cannot be told apart.
    reward = reward_of(before_the_tests(FORGE))
    assert (reward.all_passed, reward.fraction_passed) == (0.0, 0.0)


def test_a_plain_program_cannot_forge_its_verdict_through_the_pipe():
    result = run_program("import os, sys\n" + FORGE + "\nassert False\n", LIMITS)
    assert result.outcome is Outcome.RUNTIME and not result.passed, result


def test_replacing_builtins_the_harness_uses_does_not_pass_failing_tests():
    replace = (
        "import builtins\n"
        "builtins.exec = lambda *args, **kwargs: None\n"
        "builtins.compile = lambda *args, **kwargs: None\n"
        "builtins.str = lambda *args: 'passed'"
    )
    reward = reward_of(before_the_tests(replace, body="return -1"))
    assert (reward.all_passed, reward.fraction_passed) == (0.0, 0.0)


def test_rewards_of_a_batch_keep_their_task_and_completion():
    square = CodeTask("Write square(x).", tests=("assert square(3) == 9", "assert square(-2) == 4"))
    completions = [
        [CORRECT, "def add(a, b):\n    return abs(a) + b\n", "def add(a, b):\n    return -1\n"],
        ["def square(x):\n    return x * abs(x)\n", "def square(x):\n    return x ** 2\n"],
    ]
    rewards = code_rewards([ADD, square], completions, LIMITS, workers=2)
    fractions = [[reward.fraction_passed for reward in row] for row in rewards]
    # add: 3/3, 2/3 (wrong for a < 0), 0/3 (-1 is no sum of the tests); square: 1/2 (x*|x| < 0 for x < 0), 2/2.
    assert fractions == [[1.0, pytest.approx(2 / 3), 0.0], [0.5, 1.0]]
    assert [[reward.all_passed for reward in row] for row in rewards] == [[1.0, 0.0, 0.0], [0.0, 1.0]]


def test_at_most_workers_programs_run_at_once():
    sleeps = before_the_tests("import time\ntime.sleep(0.6)")
    start = time.monotonic()
    rewards = code_rewards([ADD], [[sleeps] * 3], LIMITS, workers=1)
    assert time.monotonic() - start >= 3 * 0.6  # one at a time
    assert [reward.all_passed for reward in rewards[0]] == [1.0] * 3


def test_a_task_needs_tests_and_completions_per_task():
    with pytest.raises(ValueError):
        CodeTask(ADD.prompt, tests=())
    with pytest.raises(ValueError):
        CodeTask(" ", tests=ADD.tests)
    with pytest.raises(ValueError):
        code_rewards([ADD], [[CORRECT], [CORRECT]], LIMITS)


def test_many_tests_with_long_failure_messages_all_come_back():
    # ~1 MB of records, far more than a pipe holds: the sandbox reads them while the program runs.
    failing = "assert add(1, 1) == 3, 'long message ' * 100"
    task = CodeTask(ADD.prompt, tests=(failing,) * 2000 + ("assert add(1, 1) == 2",))
    reward = reward_of("def add(a, b):\n    return a + b\n", task, SandboxLimits(timeout_s=60))
    assert reward.test_outcomes == (Outcome.ASSERTION,) * 2000 + (Outcome.PASSED,)
    assert reward.fraction_passed == pytest.approx(1 / 2001)
