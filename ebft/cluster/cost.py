"""What training costs in machine time, and the floor EBFT's cost has against SFT's.

A step's machine time is each pool's devices times the seconds they were busy on it: GPUs where the pool
has them, else the cores its threads run on (ebft.cpu_threads). Generation and embedding (RLVR: verifying) are
timed inside their actors (a shard's elapsed_s), the learner from the controller (its optimizer step and weight
push, every rank busy). Held-out evaluations are not training and are left out.

The floor: per document the learner's packed row holds S = T + n*NB*G tokens where SFT's holds T, so an
EBFT step costs at least S/T SFT steps (docs/method.md section 2), before generating and embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

from ebft.config import Config, PoolResources
from ebft.cpu_threads import actor_threads, node_cores
from ebft.layout import BlockPlan

COST_METRICS = ("cost/rollout_s", "cost/features_s", "cost/verifiers_s", "cost/learner_s", "cost/machine_s")


def pool_devices(resources: PoolResources, *, trains_alone: bool = False, ranks_on_node: int = 1) -> float:
    """The GPUs one actor of a pool holds, or on CPUs the cores its threads run on (`ranks_on_node`: learner ranks
    splitting the node's cores, cpu_threads.actor_threads)."""
    if resources.on_gpu:
        return resources.gpus_per_actor
    return min(actor_threads(resources, trains_alone=trains_alone, ranks_on_node=ranks_on_node), node_cores())


def step_cost(config: Config, metrics: dict[str, float], *, ranks_on_node: Sequence[int]) -> dict[str, float]:
    """Device-seconds of one training step from its timing/* metrics (the controller's and the actors');
    `ranks_on_node[r]`: the learner ranks on rank r's node (LearnerGroup.ranks_on_node)."""
    pools = config.resources
    trains_alone = config.training.max_staleness == 0
    learner_devices = sum(
        pool_devices(pools.learner, trains_alone=trains_alone, ranks_on_node=k) for k in ranks_on_node
    )
    cost = {
        "cost/rollout_s": metrics.get("timing/generate", 0.0) * pool_devices(pools.rollout),
        "cost/features_s": metrics.get("timing/features", 0.0) * pool_devices(pools.features),
        "cost/verifiers_s": metrics.get("timing/verifiers", 0.0) * pool_devices(pools.verifiers),
        "cost/learner_s": (metrics["timing/train"] + metrics.get("timing/weight_sync", 0.0)) * learner_devices,
    }
    cost["cost/machine_s"] = sum(cost.values())
    return cost


def floor_ratio(config: Config) -> float:
    """S/T: the learner tokens of an EBFT document over an SFT document's."""
    s = config.sampling
    plan = BlockPlan(config.data.chunk_length, s.context_length, s.stride, s.block_length, samples=s.num_samples)
    return plan.packed_length / plan.chunk_length


def machine_seconds(history: list[dict[str, float]]) -> float:
    """The machine time of the training steps in a run's metrics history (metrics.jsonl records)."""
    return sum(record.get("cost/machine_s", 0.0) for record in history)
