"""The DeepSpeed learner: steps against a plain PyTorch reference, ranks, checkpoints, weight sync.

The reference step shares no code with ebft.learner except compute_rewards for whitened rewards:
it builds the packed sequence, mask and positions with loops, runs a float64 copy of the model,
takes its own log-softmax, computes un-whitened rewards and RLOO advantages from the formulas in
docs/method.md section 4, broadcasts them to tokens itself, applies the loss of section 5, and
steps a torch AdamW with clipping and the warmup schedule.
"""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

from ebft.config import build_config
from ebft.layout import BlockPlan
from ebft.learner import checkpoint as ckpt
from ebft.learner.batches import prepare_inputs, shard_batches
from ebft.learner.engine import LearnerRank
from ebft.learner.rewards import compute_rewards
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch

T, C, S_, G, N_SAMPLES, D = 24, 4, 4, 4, 3, 16
NB = (T - G - C) // S_ + 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The ops here are tiny: a second OpenMP thread only adds synchronisation (3-4x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_config(**sections):
    raw = {
        "model": {"dtype": "float32"},
        "data": {"chunk_length": T},
        "sampling": {
            "context_length": C,
            "stride": S_,
            "block_length": G,
            "num_samples": N_SAMPLES,
            "temperature": 0.7,
        },
        "reward": {"whitening": "none", "diversity_coef": 0.5},
        "loss": {"rl_coef": 1.0, "ce_coef": 0.1},
        "optim": {"lr": 1e-3, "warmup_fraction": 0.0},
        "learner": {"zero_stage": 2, "micro_batch_docs": 2, "gradient_checkpointing": False},
        "training": {"docs_per_step": 4, "steps": 10},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build_config(raw)


def make_batch(docs: int, *, seed: int, version: int, first_chunk: int = 0, behavior=None):
    gen = torch.Generator().manual_seed(seed)
    chunks = ChunkBatch(
        list(range(first_chunk, first_chunk + docs)), torch.randint(3, 500, (docs, T), generator=gen), step=0
    )
    tokens = torch.randint(3, 500, (docs, N_SAMPLES, NB, G), generator=gen)
    if behavior is None:
        behavior = torch.zeros(docs, N_SAMPLES, NB, G)
    rollouts = RolloutBatch(chunks, tokens, behavior, weight_version=version)
    features = FeatureBatch(
        chunks.chunk_ids, torch.randn(docs, N_SAMPLES, NB, D, generator=gen), torch.randn(docs, NB, D, generator=gen)
    )
    return rollouts, features


# ----------------------------------------------------------------------------- the reference


def reference_pack(doc: torch.Tensor, rollout: torch.Tensor):
    """Packed tokens, additive mask, positions, and per (block, step) the (target, predictor) indices, by loops."""
    S = T + NB * G
    tokens, positions = doc.tolist() + [0] * (NB * G), list(range(T)) + [0] * (NB * G)
    allowed = torch.zeros(S, S, dtype=torch.bool)
    for i in range(T):
        allowed[i, : i + 1] = True
    where = {}
    for k in range(NB):
        prefix = C + k * S_
        for t in range(G):
            q = T + t * NB + k
            tokens[q], positions[q] = int(rollout[k, t]), prefix + t
            allowed[q, :prefix] = True
            for u in range(t + 1):
                allowed[q, T + u * NB + k] = True
            where[k, t] = (q, prefix - 1 if t == 0 else T + (t - 1) * NB + k)
    mask = torch.zeros(S, S, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    return torch.tensor(tokens), mask, torch.tensor(positions), where


def reference_logprobs(model, doc, rollout, temperature):
    """(log pi of every generated token [NB, G], doc token-mean NLL) of one (document, sample), float64."""
    tokens, mask, positions, where = reference_pack(doc, rollout)
    logits = model(input_ids=tokens[None], attention_mask=mask[None, None], position_ids=positions[None]).logits[0]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    gen = torch.stack(
        [torch.stack([logp[where[k, t][1], tokens[where[k, t][0]]] for t in range(G)]) for k in range(NB)]
    )
    doc_logp = torch.log_softmax(logits[: T - 1], dim=-1)
    nll = -doc_logp.gather(-1, doc[1:, None]).mean()
    return gen, nll


def reference_advantages(rollout_features, gt_features, config):
    """[docs, n, NB] advantages, one (document, block) group at a time."""
    a, d = config.reward.alignment_coef, config.reward.diversity_coef
    docs, n = rollout_features.shape[:2]
    out = torch.zeros(docs, n, NB, dtype=torch.float64)
    for i in range(docs):
        for k in range(NB):
            X, y = rollout_features[i, :, k].double(), gt_features[i, k].double()
            if config.reward.whitening != "none":
                groups = compute_rewards(
                    X[None].float(),
                    y[None].float(),
                    alignment_coef=a,
                    diversity_coef=d,
                    whitening=config.reward.whitening,
                )
                out[i, :, k] = groups.advantages[0].double()
                continue
            align = torch.stack([2 * torch.dot(X[j], y) / (X[j].norm() * y.norm()) for j in range(n)])
            div = torch.stack([2 / (n - 1) * sum(torch.dot(X[j], X[m]) for m in range(n) if m != j) for j in range(n)])
            for j in range(n):
                others = [m for m in range(n) if m != j]
                baseline = a * align[others].mean() - d * (div.sum() - 2 * div[j]) / (n - 2)
                out[i, j, k] = a * align[j] - d * div[j] - baseline
    return out


def reference_loss(model, batches, config, current_version, reference_policy=None):
    """The full-batch EBFT loss (mean over all sequences) in float64, with grads into `model`."""
    temperature, loss_cfg = config.sampling.temperature, config.loss
    pg_terms, ce_terms, kl_terms = [], [], []
    for rollouts, features in batches:
        advantages = reference_advantages(features.rollout_features, features.gt_features, config)
        stale = rollouts.weight_version < current_version
        for i in range(rollouts.tokens.shape[0]):
            for j in range(N_SAMPLES):
                doc, sample = rollouts.chunks.tokens[i], rollouts.tokens[i, j]
                logp, nll = reference_logprobs(model, doc, sample, temperature)
                weight = torch.ones_like(logp)
                if stale:
                    weight = (
                        (logp.detach() - rollouts.behavior_logprobs[i, j].double())
                        .exp()
                        .clamp(max=loss_cfg.ratio_truncation)
                    )
                pg_terms.append((weight * advantages[i, j][:, None] * logp).mean())
                ce_terms.append(nll)
                if reference_policy is not None:
                    with torch.no_grad():
                        ref_logp, _ = reference_logprobs(reference_policy, doc, sample, temperature)
                    delta = ref_logp - logp
                    kl_terms.append((delta.exp() - delta - 1).mean())
    policy_loss, ce_loss = -torch.stack(pg_terms).mean(), torch.stack(ce_terms).mean()
    loss = loss_cfg.rl_coef * policy_loss + loss_cfg.ce_coef * ce_loss
    if kl_terms:
        loss = loss + loss_cfg.kl_coef * torch.stack(kl_terms).mean()
    return loss, policy_loss, ce_loss


def float64_model(model_dir, weights: bytes | None = None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    if weights is not None:
        state = {k: v.double() for k, v in safetensors.torch.load(weights).items()}
        model.load_state_dict(state, strict=False)  # tied/untied: lm_head may be absent
    return model


def assert_gradients_match(captured: dict[str, torch.Tensor], model, atol=1e-5):
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert set(captured) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name].double(), grad, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def reference_update(model, optimizer, lr: float, grad_clip: float) -> None:
    """Clip to the global norm, then AdamW at the warmed-up LR."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()


def assert_weights_match(learner, model, atol=2e-5):
    updated = safetensors.torch.load(learner.export_weights().safetensors)
    for name, p in model.named_parameters():
        torch.testing.assert_close(updated[name].double(), p.detach(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


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
    model = float64_model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=config.optim.betas, weight_decay=0.1)
    for version, lr in enumerate([5e-4, 1e-3]):
        batch = make_batch(4, seed=10 * stage + version, version=version)
        metrics = learner.train_step([batch[0]], [batch[1]], current_version=version, capture_gradients=True)

        optimizer.zero_grad()
        loss, policy_loss, ce_loss = reference_loss(model, [batch], config, current_version=version)
        loss.backward()
        assert metrics["train/loss"] == pytest.approx(loss.item(), abs=1e-5)
        assert metrics["train/policy_loss"] == pytest.approx(float(policy_loss), abs=1e-5)
        assert metrics["train/ce_loss"] == pytest.approx(float(ce_loss), abs=1e-5)
        assert_gradients_match(learner.captured_gradients, model)
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert metrics["train/grad_norm"] == pytest.approx(float(grad_norm), rel=1e-5) and grad_norm > 0.05
        assert metrics["train/lr"] == pytest.approx(lr)
        reference_update(model, optimizer, lr, config.optim.grad_clip)
    assert_weights_match(learner, model)
    assert metrics["train/weight_version"] == 2 and learner.weight_version == 2
    learner.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3], ids=["zero0", "zero2", "zero3"])
def test_sft_step_equals_a_plain_pytorch_cross_entropy_step(tiny_model_dir, stage):
    """training.method=sft: token-mean CE of the documents, same micro-batches, clipping, schedule and AdamW."""
    config = make_config(
        training={"method": "sft", "docs_per_step": 4, "steps": 10},
        learner={"zero_stage": stage},
        optim={"grad_clip": 0.05, "weight_decay": 0.1, "warmup_fraction": 0.2},
    )
    learner = LearnerRank(config, tiny_model_dir)
    model = float64_model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=config.optim.betas, weight_decay=0.1)
    for version, lr in enumerate([5e-4, 1e-3]):
        gen = torch.Generator().manual_seed(100 + version)
        chunks = [
            ChunkBatch([0, 1], torch.randint(3, 500, (2, T), generator=gen), 0),
            ChunkBatch([2, 3], torch.randint(3, 500, (2, T), generator=gen), 0),
        ]
        metrics = learner.sft_step(chunks, current_version=version)

        optimizer.zero_grad()
        nlls = []
        for doc in torch.cat([c.tokens for c in chunks]):
            logp = torch.log_softmax(model(input_ids=doc[None]).logits[0, : T - 1], dim=-1)
            nlls.append(-sum(logp[i, doc[i + 1]] for i in range(T - 1)) / (T - 1))
        loss = torch.stack(nlls).mean()
        loss.backward()
        assert metrics["train/ce_loss"] == pytest.approx(loss.item(), abs=1e-5)
        assert metrics["train/lr"] == pytest.approx(lr)
        reference_update(model, optimizer, lr, config.optim.grad_clip)
    assert_weights_match(learner, model)
    assert metrics["train/weight_version"] == 2 and "train/policy_loss" not in metrics
    with pytest.raises(ValueError, match="needs \\[4, 24\\]"):
        learner.sft_step(chunks[:1], current_version=2)
    learner.close()


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
    model = float64_model(tiny_model_dir, learner.export_weights().safetensors)
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

    metrics = learner.train_step([fresh[0], stale[0]], [fresh[1], stale[1]], current_version=1, capture_gradients=True)
    loss, policy_loss, _ = reference_loss(model, [fresh, stale], config, current_version=1, reference_policy=initial)
    loss.backward()
    assert metrics["train/loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert metrics["train/policy_loss"] == pytest.approx(float(policy_loss), abs=1e-5)
    assert metrics["train/kl"] > 0 and metrics["train/stale_fraction"] == 0.5
    assert 0 < metrics["train/truncated_fraction"] < 0.5 and metrics["train/importance_weight_max"] == pytest.approx(
        1.05
    )
    assert_gradients_match(learner.captured_gradients, model)
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
        a[1].rollout_features[1, :, 3], a[1].gt_features[1, 3], diversity_coef=0.5, whitening="none"
    )
    torch.testing.assert_close(inputs.advantages[1, :, 3], expected.advantages)
    with pytest.raises(ValueError, match="max_staleness"):
        prepare_inputs([a[0]], [a[1]], 3, config, plan)
    with pytest.raises(ValueError, match="do not match"):
        prepare_inputs([a[0]], [b[1]], 2, config, plan)
    with pytest.raises(ValueError, match="docs_per_step"):
        LearnerRank.batch_geometry(make_config(training={"docs_per_step": 6}, learner={"micro_batch_docs": 4}), 1)


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
    update = learner.export_weights()
    tensors = safetensors.torch.load(update.safetensors)
    assert update.version == 6 and tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    learner.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
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
    final = safetensors.torch.load(learner.export_weights().safetensors)
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
    replayed = safetensors.torch.load(resumed.export_weights().safetensors)
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
    expected = single.train_step(rollouts, features, current_version=0, capture_gradients=True)
    expected_weights = safetensors.torch.load(single.export_weights().safetensors)

    with LearnerGroup(config, tiny_model_dir) as group:
        metrics = group.train_step(rollouts, features, current_version=0, capture_gradients=True)
        gradients = group.captured_gradients()
        weights = safetensors.torch.load(ray_cluster.get(group.export_weights()).safetensors)
        heldout_ce = group.document_ce(first[0].chunks.tokens)
    for name in ("loss", "policy_loss", "ce_loss", "gt_reward", "diversity_reward", "advantage_std", "grad_norm", "lr"):
        assert metrics[f"train/{name}"] == pytest.approx(expected[f"train/{name}"], rel=1e-5, abs=1e-6), name
    assert metrics["train/tokens_per_s"] > 0 and group.weight_version == 1
    for name, grad in single.captured_gradients.items():
        torch.testing.assert_close(gradients[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
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
                model = float64_model(vllm_tiny_tied_model_dir, learner.export_weights().safetensors)
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
        assert worker.update_weights(learner.export_weights()) == 2
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
            assert group.push_weights() == 1
            weights = ray_cluster.get(group.export_weights()).safetensors
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
