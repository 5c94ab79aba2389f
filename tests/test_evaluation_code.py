"""HumanEval loading, completion extraction, program building and scoring in the sandbox."""

from __future__ import annotations

import math
import re

import pytest

from ebft.evaluation.code import (
    HUMANEVAL_SIZE,
    HUMANEVAL_STOP_SEQUENCES,
    CodeProblem,
    build_program,
    extract_code,
    load_humaneval,
    score_completions,
)
from ebft.evaluation.sandbox import Outcome, SandboxLimits

LIMITS = SandboxLimits(timeout_s=10, memory_bytes=1024**3)


@pytest.fixture(scope="module")
def humaneval():
    return {problem.task_id: problem for problem in load_humaneval()}


@pytest.fixture(scope="module")
def close_elements(humaneval):
    return humaneval["HumanEval/0"]  # has_close_elements(numbers, threshold)


def test_humaneval_loads_all_problems_from_the_package(humaneval):
    assert len(humaneval) == HUMANEVAL_SIZE
    for problem in humaneval.values():
        assert re.search(rf"^def {re.escape(problem.entry_point)}\(", problem.prompt, re.M)
        assert "def check(candidate)" in problem.tests
        assert problem.canonical_solution


def test_correct_and_wrong_solutions_score_one_and_zero(close_elements):
    correct = close_elements.canonical_solution
    wrong = "    return False\n"
    report = score_completions([close_elements], [[correct, wrong, wrong]], k_values=(1, 2, 3), limits=LIMITS)
    assert report.problems[0].outcomes == [Outcome.PASSED, Outcome.ASSERTION, Outcome.ASSERTION]
    n, c = 3, 1
    for k in (1, 2, 3):
        assert report.pass_at_k[f"pass@{k}"] == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert report.outcome_counts["passed"] == 1 and report.outcome_counts["assertion"] == 2
    assert report.outcome_counts["timeout"] == 0
    assert report.num_samples == 3 and report.num_problems == 1


def test_score_mapping_by_task_id_and_metrics(humaneval):
    problems = [humaneval["HumanEval/0"], humaneval["HumanEval/2"]]  # truncate_number(x) = x % 1
    completions = {
        "HumanEval/0": [problems[0].canonical_solution],
        "HumanEval/2": ["    while True:\n        pass\n"],
    }
    report = score_completions(problems, completions, limits=SandboxLimits(timeout_s=1.5))
    assert [p.num_correct for p in report.problems] == [1, 0]
    assert report.problems[1].outcomes == [Outcome.TIMEOUT]
    metrics = report.metrics(prefix="eval/humaneval/")
    assert metrics["eval/humaneval/pass@1"] == pytest.approx(0.5)
    assert metrics["eval/humaneval/outcome/timeout"] == 1


def test_misaligned_completions_are_rejected(close_elements):
    with pytest.raises(ValueError):
        score_completions([close_elements], [["x"], ["y"]])


def test_completion_stops_before_unrelated_top_level_code(close_elements):
    body = close_elements.canonical_solution
    tails_and_markers = [
        ("\n\nprint(has_close_elements([1.0, 2.0], 0.5))\n", "print("),
        ("\n\nif __name__ == '__main__':\n    import doctest\n    doctest.testmod()\n", "__main__"),
        ("\n# Tests\nassert has_close_elements([1.0], 1.0) is False\n", "assert"),
        ("\n\ndef unrelated(:\n", "unrelated"),  # truncated: would be a syntax error
        ("\n\nraise SystemExit('tests ran in the completion')\n", "SystemExit"),
    ]
    for tail, marker in tails_and_markers:
        extracted = extract_code(close_elements.prompt, body + tail, close_elements.entry_point)
        assert not extracted.standalone
        assert extracted.code.startswith(body) and marker not in extracted.code
    completions = [body + tail for tail, _ in tails_and_markers]
    report = score_completions([close_elements], [completions], limits=LIMITS)
    assert report.problems[0].num_correct == len(completions)


def test_helper_functions_used_by_the_body_are_kept(close_elements):
    completion = (
        "    return _any_close(numbers, threshold)\n\n\n"
        "def _any_close(values, limit):\n"
        "    return any(_gap(a, b) < limit for i, a in enumerate(values) for b in values[i + 1:])\n\n\n"
        "def _gap(a, b):\n    return abs(a - b)\n\n\n"
        "def never_called():\n    pass\n"
    )
    extracted = extract_code(close_elements.prompt, completion, close_elements.entry_point)
    assert "def _any_close" in extracted.code and "def _gap" in extracted.code
    assert "never_called" not in extracted.code
    assert score_completions([close_elements], [[completion]], limits=LIMITS).pass_at_k["pass@1"] == 1.0


def truncate_at_stop_sequences(text: str) -> str:
    """What a sampler given `stop=HUMANEVAL_STOP_SEQUENCES` returns: the text before the earliest one."""
    cut = min((i for i in (text.find(s) for s in HUMANEVAL_STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def test_stop_sequences_match_the_codex_convention(close_elements):
    completion = close_elements.canonical_solution + "\n\ndef helper():\n    pass\n"
    assert truncate_at_stop_sequences(completion) == close_elements.canonical_solution + "\n"
    assert "\ndef" in HUMANEVAL_STOP_SEQUENCES and "\nprint" in HUMANEVAL_STOP_SEQUENCES
    assert truncate_at_stop_sequences("no stop here") == "no stop here"


def test_fenced_full_function_with_chatter_is_extracted(close_elements):
    completion = (
        "Solution\n```python\nfrom typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    text = '''\ndef not_a_block():\n'''\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n"
        "print(has_close_elements([1.0, 2.0], 0.5))\n```\n\nThis runs in O(n^2)."
    )
    extracted = extract_code(close_elements.prompt, completion, close_elements.entry_point)
    assert extracted.standalone
    assert "print(" not in extracted.code and "Solution" not in extracted.code and "```" not in extracted.code
    assert "def not_a_block" in extracted.code  # inside a string: not a block boundary
    program = build_program(close_elements, completion)
    assert program.rstrip().endswith("check(has_close_elements)")
    report = score_completions([close_elements], [[completion]], limits=LIMITS)
    assert report.problems[0].outcomes == [Outcome.PASSED]


def test_fenced_body_closing_fence_and_echoed_prompt(close_elements):
    body = close_elements.canonical_solution
    completions = (
        f"```python\n{body}```",
        close_elements.prompt + body,
        body + "```\n\nThis checks every pair:\nfor each element...\n",
    )
    for completion in completions:
        extracted = extract_code(close_elements.prompt, completion, close_elements.entry_point)
        assert not extracted.standalone and extracted.code.strip() == body.strip()


def test_question_prompts_with_assert_tests_and_humaneval_style_problems_score_together():
    problems = [
        CodeProblem(
            task_id="add",
            prompt="Write a function add(a, b) that returns the sum.",
            tests="assert add(1, 2) == 3\nassert add(-1, 1) == 0",
        ),
        CodeProblem(
            task_id="square",
            prompt='def square(x):\n    """Return x squared."""\n',
            tests="def check(candidate):\n    assert candidate(3) == 9\n",
            entry_point="square",
        ),
    ]
    completions = [
        [
            "```python\nMEMO = {}\n\ndef add(a, b):\n    MEMO[(a, b)] = a + b\n"
            "    return MEMO[(a, b)]\n\nprint(add(2, 2))\n```",
            "def add(a, b):\n    return a - b\n",
        ],
        ["    return x * x\n", "    return x + x\n"],
    ]
    report = score_completions(problems, completions, k_values=(1, 2), limits=LIMITS)
    assert [p.outcomes for p in report.problems] == [[Outcome.PASSED, Outcome.ASSERTION]] * 2
    assert report.pass_at_k == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1.0)}


def test_problem_program_layout_matches_humaneval(close_elements):
    program = build_program(close_elements, close_elements.canonical_solution)
    assert program.startswith(close_elements.prompt + close_elements.canonical_solution)
    assert close_elements.tests in program


@pytest.mark.slow
def test_every_canonical_humaneval_solution_passes(humaneval):
    problems = list(humaneval.values())
    report = score_completions(problems, [[p.canonical_solution] for p in problems], limits=LIMITS)
    failing = [(p.task_id, p.details) for p in report.problems if p.num_correct != 1]
    assert failing == []
    assert report.pass_at_k["pass@1"] == 1.0
