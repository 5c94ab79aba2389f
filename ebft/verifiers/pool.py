"""The verifier pool (training.method = rlvr): Ray actors that score completions, sized by resources.verifiers.

The controller hands shard i's completions to verifier i mod N, as it hands EBFT's rollouts to the feature
workers; each actor runs rlvr.sandbox_workers programs at a time (ebft/verifiers/code.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import ray
import torch

from ebft.config import Config, RlvrConfig
from ebft.evaluation.sandbox import SandboxLimits
from ebft.messages import CompletionBatch, RewardBatch, VerifiableTask
from ebft.verifiers.code import CodeTask, code_rewards
from ebft.verifiers.translation import translation_rewards


class VerifierWorker:
    def __init__(self, config: Config, log_file: str | None = None):
        from ebft.actor_output import send_output_to

        send_output_to(log_file)
        self.rlvr = config.rlvr

    def score(self, batch: CompletionBatch) -> RewardBatch:
        """rlvr.reward of every completion: code with its question's tests, or text against its references."""
        started = time.perf_counter()
        rewards, outcomes = verify(self.rlvr, batch.prompts.tasks, batch.texts)
        return RewardBatch(
            list(batch.prompts.task_ids),
            torch.tensor(rewards, dtype=torch.float32).reshape(len(batch.texts), -1),
            outcomes,
            time.perf_counter() - started,
        )


def verify(
    rlvr: RlvrConfig, tasks: Sequence[VerifiableTask], texts: Sequence[Sequence[str]]
) -> tuple[list[list[float]], dict[str, int]]:
    """rewards[question][completion] by rlvr.reward, and how many completions ended each way."""
    kind = rlvr.reward
    if kind in ("all_passed", "fraction_passed"):
        code = [CodeTask(task.question, task.tests, task.entry_point) for task in tasks]
        limits = SandboxLimits(timeout_s=rlvr.timeout_s, memory_bytes=rlvr.memory_mib << 20)
        results = code_rewards(code, texts, limits, workers=rlvr.sandbox_workers)
        rewards = [[getattr(result, kind) for result in row] for row in results]
        return rewards, dict(Counter(result.outcome.value for row in results for result in row))
    flat = translation_rewards(
        [text for row in texts for text in row],
        [task.references for task, row in zip(tasks, texts) for _ in row],
        metric=kind,
    )
    bounds = np.cumsum([0, *map(len, texts)])
    return [flat[a:b] for a, b in zip(bounds, bounds[1:])], {"scored": len(flat)}


def create_verifier(config: Config, placement_group=None, bundle_index: int = 0, log_file: str | None = None):
    """One verifier actor requesting `resources.verifiers`, in bundle `bundle_index` of the group if given."""
    from ebft.actor_resources import actor_options

    options = actor_options(config.resources.verifiers, placement_group, bundle_index)
    return ray.remote(VerifierWorker).options(**options).remote(config, log_file)
