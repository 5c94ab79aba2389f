"""Held-out accuracy on verifiable questions: the downstream metric of RLVR, measured for every method.

At every evaluation, `eval.verifier_questions` held-out questions (a fixed selection by `eval.seed`, the same for
every run, so two runs pair question by question) get one completion each at `eval.temperature`, of up to
`rlvr.max_new_tokens`, scored by the verifier RLVR trains with (`rlvr.reward`): eval/verifier/<reward>, its mean
and its value per question, which `ebft compare` pairs as it pairs HumanEval's problems.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ebft.config import Config
from ebft.data.sources import DataReport, Example
from ebft.data.tasks import PromptSet, prompt_set
from ebft.verifiers.pool import verify

METRIC_PREFIX = "eval/verifier/"


def heldout_questions(examples: list[Example], tokenizer, config: Config) -> PromptSet:
    """The seeded selection of eval.verifier_questions held-out questions (fewer if there are fewer)."""
    questions = prompt_set(examples, tokenizer, config.rlvr.max_prompt_tokens, DataReport())
    count = min(config.eval.verifier_questions, len(questions))
    chosen = sorted(np.random.default_rng(config.eval.seed).permutation(len(questions))[:count].tolist())
    return PromptSet([questions.tasks[i] for i in chosen], [questions.prompts[i] for i in chosen])


def verifier_eval(
    complete: Callable[..., list[list[list[int]]]], questions: PromptSet, tokenizer, config: Config
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(metrics, per question) of one completion of each question; `complete` is RolloutWorker.complete."""
    if not len(questions):
        return {}, {}
    completions = complete(
        questions.prompts,
        n=1,
        temperature=config.eval.temperature,
        max_tokens=config.rlvr.max_new_tokens,
        seed=config.eval.seed,
    )
    texts = [[tokenizer.decode(samples[0], skip_special_tokens=True)] for samples in completions]
    rewards, outcomes = verify(config.rlvr, questions.tasks, texts)
    name = f"{METRIC_PREFIX}{config.rlvr.reward}"
    values = [row[0] for row in rewards]
    metrics = {name: float(np.mean(values)), f"{METRIC_PREFIX}num_questions": float(len(values))}
    metrics.update({f"{METRIC_PREFIX}outcome/{outcome}": float(count) for outcome, count in outcomes.items()})
    return metrics, {name: values}
