"""The DeepSpeed learner: steps against the float64 reference of learner_reference.py, ranks, checkpoints, weights."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import exported, make_tiny_llama, pushed_weights, weights_of
from learner_reference import (
    N_SAMPLES,
    assert_gradients_match,
    assert_weights_match,
    capture_gradients,
    float64_model,
    make_batch,
    make_config,
    reference_logprobs,
    reference_loss,
    reference_update,
)
from transformers import AutoModelForCausalLM

from ebft.config import RewardConfig
from ebft.layout import BlockPlan
from ebft.learner import checkpoint as ckpt
from ebft.learner.batches import prepare_inputs, shard_batches
from ebft.learner.engine import LearnerRank
from ebft.messages import ChunkBatch, RolloutBatch
from ebft.rewards import compute_rewards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, checkpointing, offload",
    [(0, False, False), (1, False, True), (2, True, False), (3, True, False)],
    ids=["zero0", "zero1-offload", "zero2-checkpointing", "zero3-checkpointing"],
)
def test_step_equals_plain_pytorch_reference(tiny_model_dir, stage, checkpointing, offload):
    config = make_config(
        learner={"zero_stage": stage, "gradient_checkpointing": checkpointing, "offload_optimizer": offload},
        optim={"grad_clip": 0.05, "weight_decay": 0.1, "warmup_fraction": 0.2},  # 2 warmup steps; clipping active
    )
    learner = LearnerRank(config, tiny_model_dir)
    gradients = capture_gradients(learner)
    model = float64_model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=config.optim.betas, weight_decay=0.1)
    for version, lr in enumerate([5e-4, 1e-3]):
        batch = make_batch(4, seed=10 * stage + version, version=version)
        metrics = learner.train_step([batch[0]], [batch[1]], current_version=version)

        optimizer.zero_grad()
        loss, policy_loss, ce_loss = reference_loss(model, [batch], config, current_version=version)
        loss.backward()
        assert metrics["train/loss"] == pytest.approx(loss.item(), abs=1e-5)
        assert metrics["train/policy_loss"] == pytest.approx(float(policy_loss), abs=1e-5)
        assert metrics["train/ce_loss"] == pytest.approx(float(ce_loss), abs=1e-5)
        assert_gradients_match(gradients, model)
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert metrics["train/grad_norm"] == pytest.approx(float(grad_norm), rel=1e-5) and grad_norm > 0.05
        assert metrics["train/lr"] == pytest.approx(lr)
        reference_update(model, optimizer, lr, config.optim.grad_clip)
    assert_weights_match(learner, model)
    assert metrics["train/weight_version"] == 2 and learner.weight_version == 2
    learner.close()


@pytest.mark.slow
def test_bf16_gradients_accumulate_in_float32(tiny_model_dir, monkeypatch):
    """16 micro-batches in bf16: the step's gradient is nearer the float64 one than DeepSpeed's own bf16 sum."""
    import ebft.learner.engine as engine

    config = make_config(
        model={"dtype": "bfloat16"},
        learner={"zero_stage": 2, "gradient_checkpointing": False},
        training={"docs_per_step": 16, "steps": 10},
    )
    rollouts, features = make_batch(16, seed=3, version=0)
    bf16_weights = {k: v.to(torch.bfloat16).double() for k, v in float64_model(tiny_model_dir).state_dict().items()}
    model = float64_model(tiny_model_dir, bf16_weights)  # the weights the bf16 learner starts from, in float64
    reference_loss(model, [(rollouts, features)], config, current_version=0)[0].backward()

    def gradient_error() -> float:
        learner = LearnerRank(config, tiny_model_dir)
        captured = capture_gradients(learner)
        learner.train_step([rollouts], [features], current_version=0)
        learner.close()
        squared = sum((captured[name].double() - p.grad).square().sum() for name, p in model.named_parameters())
        return math.sqrt(squared / sum(p.grad.square().sum() for p in model.parameters()))

    ours = gradient_error()
    deepspeed_config = engine.deepspeed_config
    monkeypatch.setattr(engine, "deepspeed_config", lambda *args: {**deepspeed_config(*args), "data_types": {}})
    summed_in_bf16 = gradient_error()
    assert ours < 0.95 * summed_in_bf16, (ours, summed_in_bf16)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_stale_rollouts_kl_and_whitening_match_reference(tiny_model_dir, stage):
    """Second step: one fresh batch and one stale batch (truncated ratio), KL to the initial policy,
    whitened rewards."""
    config = make_config(
        reward={"whitening": "sample"},
        loss={"kl_coef": 0.2, "ratio_truncation": 1.05},
        training={"max_staleness": 1},
        learner={"micro_batch_docs": 1, "zero_stage": stage},
    )
    learner = LearnerRank(config, tiny_model_dir)
    # Under ZeRO-3 the KL reference is partitioned like the policy: no rank holds a whole copy.
    reference_elements = sum(p.numel() for p in learner.reference_model.parameters())
    assert (reference_elements == 0) == (stage == 3)
    warm = make_batch(4, seed=10, version=0)
    learner.train_step([warm[0]], [warm[1]], current_version=0)
    gradients = capture_gradients(learner)
    model = float64_model(tiny_model_dir, weights_of(exported(learner)))
    initial = float64_model(tiny_model_dir)

    fresh = make_batch(2, seed=11, version=1, first_chunk=100)
    stale = make_batch(2, seed=12, version=0, first_chunk=200)
    with torch.no_grad():  # behavior log-probs: the current ones perturbed, so ratios spread around 1
        true = torch.stack(
            [
                torch.stack(
                    [
                        reference_logprobs(model, stale[0].chunks.tokens[i], stale[0].tokens[i, j], 0.7)[0]
                        for j in range(N_SAMPLES)
                    ]
                )
                for i in range(2)
            ]
        )
    stale[0].behavior_logprobs = (
        true + 0.1 * torch.randn(true.shape, generator=torch.Generator().manual_seed(0))
    ).float()

    metrics = learner.train_step([fresh[0], stale[0]], [fresh[1], stale[1]], current_version=1)
    loss, policy_loss, _ = reference_loss(model, [fresh, stale], config, current_version=1, reference_policy=initial)
    loss.backward()
    assert metrics["train/loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert metrics["train/policy_loss"] == pytest.approx(float(policy_loss), abs=1e-5)
    assert metrics["train/kl"] > 0 and metrics["train/stale_fraction"] == 0.5
    assert 0 < metrics["train/truncated_fraction"] < 0.5 and metrics["train/importance_weight_max"] == pytest.approx(
        1.05
    )
    assert_gradients_match(gradients, model)
    learner.close()


def test_batches_are_validated_and_sharded():
    config = make_config(training={"docs_per_step": 4, "max_staleness": 0})
    plan = BlockPlan.from_config(config)
    a, b = make_batch(3, seed=0, version=2), make_batch(1, seed=1, version=2, first_chunk=3)
    shards = shard_batches([a[0], b[0]], [a[1], b[1]], 2)
    assert [[r.chunks.chunk_ids for r in rs] for rs, _ in shards] == [[[0, 1]], [[2], [3]]]
    assert torch.equal(shards[1][0][0].tokens, a[0].tokens[2:]) and torch.equal(
        shards[1][1][1].gt_features, b[1].gt_features
    )
    inputs = prepare_inputs([a[0]], [a[1]], 2, config, plan)
    expected = compute_rewards(
        a[1].rollout_features[1, 3], a[1].gt_features[1, 3], RewardConfig(diversity_coef=0.5, whitening="none")
    )
    torch.testing.assert_close(inputs.advantages[1, :, 3], expected.advantages)
    with pytest.raises(ValueError, match="max_staleness"):
        prepare_inputs([a[0]], [a[1]], 3, config, plan)
    with pytest.raises(ValueError, match="do not match"):
        prepare_inputs([a[0]], [b[1]], 2, config, plan)
    with pytest.raises(ValueError, match="docs_per_step"):
        make_config(training={"docs_per_step": 6}, learner={"micro_batch_docs": 4})


@pytest.mark.slow
def test_training_loss_falls_in_bf16_zero2_with_checkpointing(tiny_model_dir):
    config = make_config(
        model={"dtype": "bfloat16"},
        learner={"zero_stage": 2, "gradient_checkpointing": True},
        optim={"lr": 3e-3, "warmup_fraction": 0.2},
        training={"docs_per_step": 4, "steps": 10},
    )
    learner = LearnerRank(config, tiny_model_dir)
    rollouts, features = make_batch(4, seed=3, version=0)
    history = []
    for _ in range(6):
        rollouts.weight_version = learner.weight_version  # the same batch, always fresh
        history.append(learner.train_step([rollouts], [features], current_version=learner.weight_version))
    losses = [m["train/loss"] for m in history]
    assert losses[-1] < losses[0] - 0.1, losses
    assert history[-1]["train/ce_loss"] < history[0]["train/ce_loss"]
    assert [m["train/lr"] for m in history[:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])  # 2 warmup steps
    assert [m["train/weight_version"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert all(
        math.isfinite(m["train/grad_norm"]) and m["train/grad_norm"] > 0 and m["train/tokens_per_s"] > 0
        for m in history
    )
    update = exported(learner)
    tensors = weights_of(update)
    assert update.version == 6 and tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    learner.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3], ids=["zero1", "zero2", "zero3"])  # bf16 ZeRO-1: DeepSpeed's BF16_Optimizer
def test_checkpoint_is_atomic_keeps_last_k_and_resumes_exactly(tiny_model_dir, tmp_path, stage):
    config = make_config(model={"dtype": "bfloat16"}, checkpoint={"keep_last": 2}, learner={"zero_stage": stage})
    batches = [make_batch(4, seed=20 + i, version=i, first_chunk=4 * i) for i in range(3)]
    learner = LearnerRank(config, tiny_model_dir)
    for i, (r, f) in enumerate(batches):
        learner.train_step([r], [f], current_version=i)
        learner.save_checkpoint(ckpt.checkpoint_path(tmp_path, i + 1), {"data_position": 4 * (i + 1)})
    (tmp_path / ".step_00000009.tmp").mkdir()  # an interrupted save is ignored
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "step_00000002",
        "step_00000003",
    ]
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, 3)

    # The HF folder reloads into transformers with the learner's exact weights and logits.
    final = weights_of(exported(learner))
    reloaded = AutoModelForCausalLM.from_pretrained(
        ckpt.latest_checkpoint(tmp_path), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    assert all(torch.equal(reloaded.state_dict()[name], tensor) for name, tensor in final.items())
    assert final["model.embed_tokens.weight"].dtype == torch.bfloat16
    tokens = batches[0][0].chunks.tokens[:2]
    learner.engine.module.eval()
    with torch.no_grad():
        logits, own = reloaded(input_ids=tokens).logits, learner.engine.module(input_ids=tokens).logits
        nll = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).mean((1, 2))
    if stage < 3:
        assert torch.equal(logits, own)
    else:  # ZeRO-3 runs linears through its own matmul: the same weights, a few bf16 ulps apart
        torch.testing.assert_close(logits, own, atol=4e-3, rtol=0)
    torch.testing.assert_close(learner.document_ce(tokens), nll, atol=1e-5 if stage < 3 else 1e-3, rtol=0)

    # Resuming from step 2 and replaying step 3 reproduces the weights bit for bit (fp32 master + Adam state).
    resumed = LearnerRank(config, tiny_model_dir)
    extra = resumed.load_checkpoint(ckpt.checkpoint_path(tmp_path, 2))
    assert extra == {"data_position": 8} and (resumed.step, resumed.weight_version) == (2, 2)
    resumed.train_step([batches[2][0]], [batches[2][1]], current_version=2)
    replayed = weights_of(exported(resumed))
    assert all(torch.equal(replayed[name], final[name]) for name in final)
    learner.close()
    resumed.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_world_size_two_gives_the_update_of_world_size_one(tiny_model_dir, ray_cluster, stage):
    from ebft.learner.group import LearnerGroup

    config = make_config(learner={"zero_stage": stage, "micro_batch_docs": 1}, resources={"learner": {"num_actors": 2}})
    first, second = make_batch(2, seed=30, version=0), make_batch(2, seed=31, version=0, first_chunk=2)
    rollouts, features = [first[0], second[0]], [first[1], second[1]]

    single = LearnerRank(config.model_copy(update={"resources": make_config().resources}), tiny_model_dir)
    expected = single.train_step(rollouts, features, current_version=0)
    expected_weights = weights_of(exported(single))

    with LearnerGroup(config, tiny_model_dir) as group:
        metrics = group.train_step(rollouts, features, current_version=0)
        weights = pushed_weights(group)
        heldout_ce = group.document_ce(first[0].chunks.tokens)
    for name in ("loss", "policy_loss", "ce_loss", "gt_reward", "diversity_reward", "advantage_std", "grad_norm", "lr"):
        assert metrics[f"train/{name}"] == pytest.approx(expected[f"train/{name}"], rel=1e-5, abs=1e-6), name
    assert metrics["train/tokens_per_s"] > 0 and group.weight_version == 1
    assert set(weights) == set(expected_weights)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(heldout_ce, single.document_ce(first[0].chunks.tokens), atol=1e-6, rtol=0)
    single.close()


@pytest.fixture(scope="module")
def vllm_tiny_tied_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-vllm"), tie_word_embeddings=True, seed=5, layers=2)


@pytest.mark.slow
def test_checkpoint_and_weight_updates_load_into_a_rollout_worker(vllm_tiny_tied_model_dir, tmp_path):
    """vLLM's log-probs of its own samples equal the learner's packed forward, from a checkpoint and after an update."""
    from ebft.actors.rollout import RolloutWorker

    config = make_config(rollout={"kv_cache_gib": 0.05})
    learner = LearnerRank(config, vllm_tiny_tied_model_dir)
    first = make_batch(4, seed=40, version=0)
    learner.train_step([first[0]], [first[1]], current_version=0)
    path = learner.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), {})
    worker = RolloutWorker(config, str(path), enforce_eager=True)
    try:
        chunks = ChunkBatch([0, 1], first[0].chunks.tokens[:2], step=0)

        def learner_logprobs(rollouts: RolloutBatch) -> torch.Tensor:
            with torch.no_grad():
                model = float64_model(vllm_tiny_tied_model_dir, weights_of(exported(learner)))
                return torch.stack(
                    [
                        torch.stack(
                            [
                                reference_logprobs(model, chunks.tokens[i], rollouts.tokens[i, j], 0.7)[0]
                                for j in range(N_SAMPLES)
                            ]
                        )
                        for i in range(2)
                    ]
                )

        sampled = worker.generate(chunks)
        assert sampled.weight_version == 0  # the worker counts its own updates; the checkpoint says 1
        torch.testing.assert_close(sampled.behavior_logprobs.double(), learner_logprobs(sampled), atol=2e-5, rtol=0)

        second = make_batch(4, seed=41, version=1)
        learner.train_step([second[0]], [second[1]], current_version=1)
        assert worker.update_weights(exported(learner)) == 2
        resampled = worker.generate(chunks)
        assert resampled.weight_version == 2
        torch.testing.assert_close(resampled.behavior_logprobs.double(), learner_logprobs(resampled), atol=2e-5, rtol=0)
    finally:
        worker.shutdown()
        learner.close()


@pytest.mark.slow
def test_group_pushes_weights_from_rank_0_to_rollout_actors(vllm_tiny_tied_model_dir, ray_cluster):
    from ebft.actors.rollout import RolloutWorker
    from ebft.learner.group import LearnerGroup

    config = make_config(rollout={"kv_cache_gib": 0.05}, learner={"zero_stage": 3})
    actor = ray_cluster.remote(num_cpus=1)(RolloutWorker).remote(
        config, str(vllm_tiny_tied_model_dir), enforce_eager=True
    )
    try:
        with LearnerGroup(config, vllm_tiny_tied_model_dir) as group:
            group.connect_weight_receivers([actor])
            batch = make_batch(4, seed=50, version=0)
            group.train_step([batch[0]], [batch[1]], current_version=0)
            assert group.push_weights().confirm() == 1
            weights = pushed_weights(group)
        chunks = ChunkBatch([0], batch[0].chunks.tokens[:1], step=0)
        sampled = ray_cluster.get(actor.generate.remote(chunks))
        assert sampled.weight_version == 1
        model = float64_model(vllm_tiny_tied_model_dir, weights)
        with torch.no_grad():
            expected = torch.stack(
                [reference_logprobs(model, chunks.tokens[0], sampled.tokens[0, j], 0.7)[0] for j in range(N_SAMPLES)]
            )
        torch.testing.assert_close(sampled.behavior_logprobs[0].double(), expected, atol=2e-5, rtol=0)
    finally:
        ray_cluster.kill(actor)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from ebft.learner.checkpoint import capture_rng_state, load_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    torch.save(capture_rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    first = (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3))
    load_rng_state(tmp_path / "rng.pt", torch.device("cpu"))
    again = (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_rng_state(tmp_path / "missing.pt", torch.device("cpu"))
