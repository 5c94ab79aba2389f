"""Two Ray nodes on loopback, started with `ray start` as on real machines: the pools sit on different nodes,
a job submitted to the head's job server trains and stops, and a node that dies with its actors is survived.

One cluster for the module: the head offers `trainer_node` (learner and feature workers, and this driver),
a worker node offers `rollout_node` (the rollout actors), so rollouts, features and weights cross nodes.
The node-death test runs last: it replaces the worker node.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import ray
import yaml
from helpers import tiny_run_config
from ray_cluster import LoopbackCluster, wait_for_nodes, wait_until_the_head_accepts_jobs

from ebft.cluster.train import JOB_ENV, run
from ebft.config import build_config

pytestmark = pytest.mark.slow
POOL_NODES = {"rollout": "rollout_node", "features": "trainer_node", "learner": "trainer_node"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LoopbackCluster(tmp_path_factory.mktemp("ray-nodes"))
    try:
        cluster.start_head(num_cpus=2, resources={"trainer_node": 8})
        # The driver joins while the head is the only node, so it is the head's (and survives the worker).
        ray.init(address=cluster.gcs_address, runtime_env={"env_vars": JOB_ENV}, log_to_driver=False)
        cluster.worker = cluster.add_node(num_cpus=2, resources={"rollout_node": 8})
        wait_for_nodes(2)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def two_node_config(model_dir, output_dir, **sections) -> dict:
    raw = tiny_run_config(model_dir, output_dir, **sections)
    for pool, node in POOL_NODES.items():
        raw["resources"][pool]["node_resources"] = {node: 1}
    return raw


def actor_nodes() -> dict[str, tuple[str, str | None]]:
    """{actor id: (class name, node id)} of every actor the cluster has started, dead ones included
    (node None: it never ran)."""
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, raise_on_missing_output=False)
    return {a.actor_id: (a.class_name, a.node_id) for a in actors}


def nodes_of_new_actors(before: dict) -> dict[str, set[str]]:
    """{actor class: the nodes its actors started since `before` ran on}."""
    nodes: dict[str, set[str]] = {}
    for actor_id, (class_name, node) in actor_nodes().items():
        if actor_id not in before and node is not None:
            nodes.setdefault(class_name, set()).add(node)
    return nodes


def node_with(resource: str) -> str:
    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
    return node


def test_pools_run_on_the_nodes_their_resources_name(cluster, tiny_model_with_tokenizer, tmp_path):
    before = actor_nodes()
    config = build_config(two_node_config(tiny_model_with_tokenizer, tmp_path / "run"))
    summary = run(config, address=cluster.gcs_address)
    assert summary.trained_chunks == summary.scheduled_chunks == 6
    new = nodes_of_new_actors(before)
    trainer, rollout = node_with("trainer_node"), node_with("rollout_node")
    assert trainer != rollout
    assert new["RolloutWorker"] == {rollout}
    assert new["FeatureWorker"] == {trainer}
    assert new["LearnerRankActor"] == {trainer}


def test_a_job_submitted_to_the_head_finishes(cluster, tiny_model_with_tokenizer, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ebft.cluster.submit import submit

    wait_until_the_head_accepts_jobs(cluster.dashboard_address)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(two_node_config(tiny_model_with_tokenizer, tmp_path / "run")))
    job_id = submit(str(path), ["training.steps=2"], address=cluster.dashboard_address)
    client = JobSubmissionClient(cluster.dashboard_address)
    deadline = time.time() + 600
    while not client.get_job_status(job_id).is_terminal():
        assert time.time() < deadline, client.get_job_logs(job_id)[-4000:]
        time.sleep(1)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("train/policy_loss") == 2


def test_ray_job_stop_checkpoints_the_job(cluster, tiny_model_with_tokenizer, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ebft.cluster.submit import submit

    wait_until_the_head_accepts_jobs(cluster.dashboard_address)
    config = two_node_config(
        tiny_model_with_tokenizer, tmp_path / "run", data={"max_examples": 8, "heldout_fraction": 0.0}
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    job_id = submit(str(path), ["training.steps=50"], address=cluster.dashboard_address)  # the override runs
    client = JobSubmissionClient(cluster.dashboard_address)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and "train/policy_loss" in metrics.read_text()):
        status = client.get_job_status(job_id)
        assert status in {JobStatus.PENDING, JobStatus.RUNNING}, client.get_job_logs(job_id)[-4000:]
        time.sleep(1)
    assert client.stop_job(job_id)  # SIGTERM: the job finishes its step and saves a checkpoint
    while time.time() < deadline and not client.get_job_status(job_id).is_terminal():
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    trained = metrics.read_text().count("train/policy_loss")
    assert 1 <= trained < 50, logs[-4000:]
    checkpoints = sorted(folder.name for folder in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoints[-1] == f"step_{trained:08d}", logs[-4000:]
    assert "stopped early" in logs


def test_a_node_that_dies_mid_run_is_waited_for_and_nothing_is_lost(
    cluster, tiny_model_with_tokenizer, tmp_path, caplog, monkeypatch
):
    """The rollout node is killed after the first step; the replacement actor waits, saying so, until a new
    node with `rollout_node` joins; then the run finishes with every scheduled chunk trained exactly once."""
    from ebft.cluster import pools

    monkeypatch.setattr(pools, "REPLACEMENT_NOTICE_S", 2.0)
    caplog.set_level(logging.WARNING, logger="ebft.cluster.pools")
    before = actor_nodes()
    config = build_config(two_node_config(tiny_model_with_tokenizer, tmp_path / "run", training={"steps": 5}))
    metrics = tmp_path / "run" / "metrics.jsonl"
    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(run(config, address=cluster.gcs_address)))
    runner.start()
    deadline = time.time() + 600
    while not (metrics.exists() and "train/policy_loss" in metrics.read_text()):
        assert runner.is_alive() and time.time() < deadline, "the run ended before its first step"
        time.sleep(0.2)
    lost = node_with("rollout_node")
    cluster.kill_node(cluster.worker)
    while "waited" not in caplog.text:
        assert runner.is_alive() and time.time() < deadline, "the run never said it waits for a node"
        time.sleep(0.5)
    assert "rollout actor 0" in caplog.text and "rollout_node" in caplog.text
    cluster.worker = cluster.add_node(num_cpus=2, resources={"rollout_node": 8})
    runner.join(timeout=600)
    assert not runner.is_alive() and summaries, "the run did not finish after the new node joined"
    summary = summaries[0]
    assert summary.restarts >= 1
    assert summary.trained_chunks == summary.scheduled_chunks == 10
    assert sorted(summary.trained_chunk_ids) == list(range(10))
    assert nodes_of_new_actors(before)["RolloutWorker"] == {lost, node_with("rollout_node")}
