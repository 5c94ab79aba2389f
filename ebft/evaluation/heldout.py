"""Held-out metrics on packed chunks: cross-entropy, conditional feature matching, alignment reward.

The evaluator is given three functions, so the same code runs against Ray actors during training
and against in-process engines in `ebft eval`:
    generate(ChunkBatch, num_samples) -> RolloutBatch   the current policy's rollouts (training geometry)
    embed(RolloutBatch) -> FeatureBatch                 the frozen feature network
    document_ce(tokens [docs, T]) -> [docs]             teacher-forced token-mean NLL under the policy

Every evaluation of a run samples the same chunks with the same seeds (docs/method.md section 8),
and keeps its per-chunk values, so two evaluations are compared chunk by chunk
(`paired_differences`) with a bootstrap interval over source files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ebft.config import Config
from ebft.evaluation.stats import Difference, paired_difference
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch
from ebft.objective import cfm_plugin, cfm_unbiased
from ebft.rewards import compute_rewards

# Sampling seeds of held-out rollouts come from this step number (plus eval.seed), far from any training step.
EVAL_SEED_STEP = 1 << 30
# Metrics kept per held-out chunk; their differences between evaluations get intervals.
PAIRED_METRICS = ("eval/full_ce_loss", "eval/cfm", "eval/cfm_plugin", "eval/reward_pass1_gt")


@dataclass
class Evaluation:
    """One held-out evaluation: the means, and the per-chunk values behind them."""

    step: int
    metrics: dict[str, float]
    chunk_ids: list[int]
    groups: list[int]
    """The source example (file) each chunk starts in: the bootstrap's resampling unit."""
    per_chunk: dict[str, list[float]]
    measured: dict[str, Any] = field(default_factory=dict)
    """What the values measure (`measurement`): two evaluations pair only if these agree (empty in older files)."""
    per_problem: dict[str, list[float]] = field(default_factory=dict)
    """HumanEval pass@k of each problem (eval/humaneval/pass@k), in the problems' order."""

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(asdict(self)) + "\n")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: Path) -> Evaluation:
        return cls.from_record(json.loads(Path(path).read_text()))

    @classmethod
    def from_record(cls, record: dict) -> Evaluation:
        """From a saved evaluation, or the metrics JSON of `ebft eval` (which has no step, and more keys)."""
        fields = {name: record[name] for name in ("metrics", "chunk_ids", "groups", "per_chunk")}
        extra = {"measured": record.get("measured", {}), "per_problem": record.get("per_problem", {})}
        return cls(step=record.get("step", 0), **extra, **fields)


def measurement(config: Config, chunks: ChunkBatch) -> dict[str, Any]:
    """The chunks (a digest of their tokens) and the settings that define the held-out values: evaluations that
    differ in any of these measure different things and are not paired."""
    s = config.sampling
    return {
        "chunks": hashlib.sha256(chunks.tokens.to(torch.int64).numpy().tobytes()).hexdigest()[:16],
        "eval.seed": config.eval.seed,
        "eval.num_samples": config.eval.num_samples,
        "sampling": [s.context_length, s.stride, s.block_length, s.temperature],
        "features": [list(config.features.layer_fractions), config.features.pooling],
        "reward.whitening": config.reward.whitening,
    }


def feature_metrics(config: Config, features: FeatureBatch) -> dict[str, torch.Tensor]:
    """Per-chunk [docs] values: unbiased and plug-in CFM (means over blocks), alignment reward pass@1/pass@k."""
    alignment = compute_rewards(
        features.rollout_features, features.gt_features, config.reward
    ).alignment  # [docs, NB, n]
    return {
        "eval/cfm": cfm_unbiased(features.rollout_features, features.gt_features).mean(-1),
        "eval/cfm_plugin": cfm_plugin(features.rollout_features, features.gt_features).mean(-1),
        "eval/reward_pass1_gt": alignment.double().mean(dim=(1, 2)),
        "eval/reward_passk_gt": alignment.double().max(dim=-1).values.mean(-1),
    }


class HeldoutEvaluator:
    def __init__(self, config: Config, heldout: ChunkBatch | None, groups: list[int] | None = None):
        self.config = config
        self.chunks = None
        if heldout is not None:
            self.chunks = ChunkBatch(heldout.chunk_ids, heldout.tokens, EVAL_SEED_STEP + config.eval.seed)
        self.groups = list(groups) if groups is not None else list(range(len(heldout.chunk_ids) if heldout else 0))
        self.measured = measurement(config, self.chunks) if self.chunks is not None else {}

    @property
    def chunk_ids(self) -> list[int]:
        return list(self.chunks.chunk_ids) if self.chunks is not None else []

    @property
    def enabled(self) -> bool:
        return self.chunks is not None and self.config.eval.every > 0

    def run(
        self,
        generate: Callable[[ChunkBatch, int], RolloutBatch],
        embed: Callable[[RolloutBatch], FeatureBatch],
        document_ce: Callable[[torch.Tensor], torch.Tensor],
        step: int = 0,
    ) -> Evaluation:
        if self.chunks is None:
            raise ValueError("no held-out chunks to evaluate on: raise data.heldout_fraction")
        per_chunk = {"eval/full_ce_loss": document_ce(self.chunks.tokens).double()}
        per_chunk.update(feature_metrics(self.config, embed(generate(self.chunks, self.config.eval.num_samples))))
        metrics = {name: values.mean().item() for name, values in per_chunk.items()}
        metrics["eval/full_perplexity"] = math.exp(metrics["eval/full_ce_loss"])
        return Evaluation(
            step=step,
            metrics=metrics,
            chunk_ids=self.chunk_ids,
            groups=self.groups,
            per_chunk={name: values.tolist() for name, values in per_chunk.items() if name in PAIRED_METRICS},
            measured=self.measured,
        )


def check_same_chunks(this: Evaluation | HeldoutEvaluator, other: Evaluation) -> None:
    """Two evaluations pair chunk by chunk only on the same chunks, sampled and embedded the same way."""
    both = bool(this.measured and other.measured)  # older files do not say what they measured
    if list(this.chunk_ids) != list(other.chunk_ids) or both and this.measured["chunks"] != other.measured["chunks"]:
        raise ValueError(
            "the two evaluations were run on different held-out chunks; compare runs with the same data, "
            "data.chunk_length, data.heldout_fraction, eval.num_docs and eval.seed"
        )
    if both:
        differ = [
            f"{key} {value} vs {other.measured.get(key)}"
            for key, value in this.measured.items()
            if key != "chunks" and value != other.measured.get(key)
        ]
        if differ:
            raise ValueError(f"the two evaluations measured the held-out chunks differently ({'; '.join(differ)})")


def paired_differences(after: Evaluation, before: Evaluation) -> dict[str, Difference]:
    """after - before for every per-chunk metric, with a 95% bootstrap interval over source files."""
    check_same_chunks(after, before)
    return {
        name: paired_difference(after.per_chunk[name], before.per_chunk[name], after.groups)
        for name in PAIRED_METRICS
        if name in after.per_chunk and name in before.per_chunk
    }
