"""Machine time and the EBFT/SFT floor (ebft.cluster.cost), against hand computations."""

from __future__ import annotations

import pytest

from ebft.cluster.cost import floor_ratio, pool_devices, step_cost
from ebft.config import build_config


@pytest.mark.parametrize(
    ("chunk_length", "context", "stride", "block", "samples"),
    [(128, 8, 8, 8, 4), (1024, 8, 8, 8, 4), (64, 4, 4, 8, 2)],
)
def test_floor_is_the_packed_row_over_the_document(chunk_length, context, stride, block, samples):
    config = build_config(
        {
            "data": {"chunk_length": chunk_length},
            "sampling": {"context_length": context, "stride": stride, "block_length": block, "num_samples": samples},
        }
    )
    blocks = len(range(context, chunk_length - block + 1, stride))  # nested prefixes with a whole block after them
    assert floor_ratio(config) == (chunk_length + samples * blocks * block) / chunk_length
    if (chunk_length, samples) == (128, 4):
        assert floor_ratio(config) == 4.75  # the demo's T = 128: 15 blocks of 8 tokens, 4 samples each
    if chunk_length == 1024:
        assert floor_ratio(config) == pytest.approx(4.97, abs=0.005)  # the paper's T = 1024


def test_step_cost_weights_each_pool_by_its_devices():
    config = build_config(
        {
            "resources": {
                "rollout": {"num_actors": 2, "gpus_per_actor": 1, "cpus_per_actor": 4},
                "features": {"num_actors": 1, "gpus_per_actor": 0.5, "cpus_per_actor": 2},
                "learner": {"num_actors": 4, "gpus_per_actor": 1, "cpus_per_actor": 4},
                "verifiers": {"num_actors": 2, "cpus_per_actor": 1},
            },
            "training": {"docs_per_step": 16},
        }
    )
    timings = {"timing/generate": 10.0, "timing/features": 3.0, "timing/train": 2.0, "timing/weight_sync": 0.5}
    cost = step_cost(config, {**timings, "timing/verifiers": 4.0}, ranks_on_node=[4, 4, 4, 4])
    # Generation, features and verifying are summed over their shards already; all 4 learner GPUs train and push;
    # a verifier on one CPU counts that core.
    assert cost == {
        "cost/rollout_s": 10.0,
        "cost/features_s": 1.5,
        "cost/verifiers_s": 4.0,
        "cost/learner_s": 10.0,
        "cost/machine_s": 25.5,
    }
    sft = step_cost(config, {"timing/train": 2.0, "timing/weight_sync": 0.0}, ranks_on_node=[4, 4, 4, 4])
    assert sft["cost/machine_s"] == 8.0


def test_cpu_pools_count_the_cores_their_threads_run_on(monkeypatch):
    monkeypatch.setattr("ebft.cluster.cost.node_cores", lambda: 8)
    monkeypatch.setattr("ebft.cpu_threads.node_cores", lambda: 8)
    config = build_config(
        {
            "resources": {
                "rollout": {"cpus_per_actor": 2},
                "features": {"cpus_per_actor": 0.5},
                "learner": {"cpus_per_actor": 1, "threads": 3},
            },
        }
    )
    r = config.resources
    assert (pool_devices(r.rollout), pool_devices(r.features), pool_devices(r.learner)) == (2, 1, 3)
    # A CPU learner rank whose training nothing overlaps takes the node's cores.
    r.learner.threads = None
    assert pool_devices(r.learner, trains_alone=True) == 8
    assert pool_devices(r.learner) == 1


@pytest.mark.parametrize(
    ("node_cores", "ranks_on_node"),
    [(2, [2, 2]), (2, [1, 1]), (8, [3, 3, 3]), (8, [2, 2, 1])],
)
def test_cpu_learner_ranks_on_one_node_split_its_cores(monkeypatch, node_cores, ranks_on_node):
    """Training alone (max_staleness 0), the k learner ranks of a node run node_cores // k threads each."""
    monkeypatch.setattr("ebft.cluster.cost.node_cores", lambda: node_cores)
    monkeypatch.setattr("ebft.cpu_threads.node_cores", lambda: node_cores)
    ranks = len(ranks_on_node)

    def learner_cost(max_staleness: int, timings: dict[str, float]) -> float:
        learner = {"num_actors": ranks, "cpus_per_actor": 1}
        config = build_config(
            {
                "resources": {"learner": learner},
                "training": {"docs_per_step": 6 * ranks, "max_staleness": max_staleness},
            }
        )
        return step_cost(config, timings, ranks_on_node=ranks_on_node)["cost/learner_s"]

    train_s, push_s = 3.0, 0.5
    cores = 0
    for k in ranks_on_node:
        cores += node_cores // k
    assert learner_cost(0, {"timing/train": train_s, "timing/weight_sync": push_s}) == (train_s + push_s) * cores
    # Overlapping the pools, each rank keeps floor(cpus_per_actor) = 1 thread wherever it runs.
    assert learner_cost(1, {"timing/train": train_s}) == train_s * ranks
