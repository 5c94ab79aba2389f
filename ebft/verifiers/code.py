"""Code rewards: each completion runs with its task's unit tests in the sandbox.

The completion's code is extracted as for evaluation (ebft/evaluation/code.py), then every test runs
in the program's globals; the sandbox reports each test's outcome through its nonce-checked pipe, so
output, exit statuses and forks do not change a reward (ebft/evaluation/sandbox.py says what can).
All the programs of a step run together, at most `workers` at a time, each under `limits.timeout_s`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ebft.evaluation.code import CodeProblem, build_program
from ebft.evaluation.sandbox import Outcome, SandboxLimits, run_programs


@dataclass(frozen=True)
class CodeTask:
    prompt: str  # the question, or the code the completion continues
    tests: tuple[str, ...]  # pieces of test code, e.g. "assert add(1, 2) == 3"; each one is a test
    entry_point: str | None = None  # the function the tests call, when the prompt names one

    def __post_init__(self) -> None:
        # An empty prompt would pass for code the completion continues, and only a function body is kept.
        if not self.prompt.strip():
            raise ValueError("a code task needs its prompt")
        if not self.tests:
            raise ValueError("a code task needs at least one test")


@dataclass(frozen=True)
class CodeReward:
    all_passed: float  # 1.0 when every test passed, else 0.0
    fraction_passed: float  # tests passed / tests
    outcome: Outcome  # the run's outcome (PASSED, or the first failure's kind)
    test_outcomes: tuple[Outcome, ...]


def solution_program(task: CodeTask, completion: str) -> str:
    """The code a completion contributes, laid out after the prompt as for evaluation, without tests."""
    return build_program(CodeProblem("", task.prompt, "", task.entry_point), completion)


def code_rewards(
    tasks: Sequence[CodeTask],
    completions: Sequence[Sequence[str]],
    limits: SandboxLimits | None = None,
    workers: int = 2,
) -> list[list[CodeReward]]:
    """Rewards [task][completion] of the completions of each task, all run in one batch."""
    if len(tasks) != len(completions):
        raise ValueError(f"{len(completions)} completion lists for {len(tasks)} tasks")
    programs, tests = [], []
    for task, samples in zip(tasks, completions):
        for completion in samples:
            programs.append(solution_program(task, completion))
            tests.append(task.tests)
    results = iter(run_programs(programs, limits or SandboxLimits(), workers=workers, tests=tests))
    rewards = []
    for samples in completions:
        row = []
        for _ in samples:
            result = next(results)
            passed = sum(outcome is Outcome.PASSED for outcome in result.tests)
            row.append(
                CodeReward(
                    all_passed=float(result.passed),
                    fraction_passed=passed / len(result.tests),
                    outcome=result.outcome,
                    test_outcomes=result.tests,
                )
            )
        rewards.append(row)
    return rewards
