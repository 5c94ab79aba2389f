"""HumanEval pass@k of a policy: sample completions through a `complete` function, score them in the sandbox.

`complete(prompts, n=, temperature=, top_p=, max_tokens=, stop=) -> list[list[str]]` returns n
completion strings per prompt. During training it wraps a Ray rollout actor, in `ebft eval` an
in-process `RolloutWorker.complete`. Only strings come back here; the generated code runs in the
sandbox's subprocesses, never in this process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ebft.config import Config
from ebft.evaluation.code import HUMANEVAL_STOP_SEQUENCES, CodeProblem, load_humaneval, score_completions
from ebft.evaluation.passk import pass_at_k
from ebft.evaluation.sandbox import SandboxLimits, isolation_summary

log = logging.getLogger(__name__)

CompleteFn = Callable[..., list[list[str]]]

METRIC_PREFIX = "eval/humaneval/"
# pass@k is reported for these k (and for k = n) when there are at least k samples per problem.
STANDARD_K = (1, 10, 100)
MAX_SANDBOX_WORKERS = 8


class CodeEval(NamedTuple):
    metrics: dict[str, float]
    per_problem: dict[str, list[float]]
    """eval/humaneval/pass@k -> each problem's unbiased pass@k, in the problems' order: what pairs two evaluations."""


def humaneval_problems(count: int) -> list[CodeProblem]:
    """The first `count` of the 164 HumanEval problems, in the file's order."""
    return load_humaneval()[:count]


def k_values(num_completions: int) -> list[int]:
    return sorted({k for k in (*STANDARD_K, num_completions) if k <= num_completions})


def generate_completions(complete: CompleteFn, problems: Sequence[CodeProblem], config: Config) -> list[list[str]]:
    """n completions per problem with the eval sampling settings, stopped at a new top-level block."""
    settings = config.eval
    completions = complete(
        [problem.prompt for problem in problems],
        n=settings.num_completions,
        temperature=settings.temperature,
        top_p=1.0,
        max_tokens=settings.max_new_tokens,
        stop=list(HUMANEVAL_STOP_SEQUENCES),
    )
    if len(completions) != len(problems) or any(len(c) != settings.num_completions for c in completions):
        shape = [len(c) for c in completions]
        raise RuntimeError(
            f"complete() returned completions per prompt {shape} for {len(problems)} prompts; "
            f"expected {settings.num_completions} each"
        )
    return completions


def code_eval(complete: CompleteFn, problems: Sequence[CodeProblem], config: Config) -> CodeEval:
    """eval/humaneval/pass@k (unbiased; k = 1, and n when more samples are drawn) and the count of
    samples per outcome (eval/humaneval/outcome/passed, .../syntax, .../timeout, ...), and pass@k per problem."""
    if not problems:
        return CodeEval({}, {})
    completions = generate_completions(complete, problems, config)
    limits = SandboxLimits(timeout_s=config.eval.timeout_s)
    log.info("running generated code in the sandbox: %s", isolation_summary(limits))
    report = score_completions(
        problems,
        completions,
        k_values=k_values(config.eval.num_completions),
        limits=limits,
        workers=max(1, min(MAX_SANDBOX_WORKERS, os.cpu_count() or 1)),
    )
    metrics = report.metrics(prefix=METRIC_PREFIX)
    metrics[f"{METRIC_PREFIX}num_problems"] = float(report.num_problems)
    per_problem = {
        f"{METRIC_PREFIX}pass@{k}": [pass_at_k(p.num_samples, p.num_correct, k) for p in report.problems]
        for k in k_values(config.eval.num_completions)
    }
    return CodeEval({name: float(value) for name, value in metrics.items()}, per_problem)
