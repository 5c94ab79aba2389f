"""A plain float64 PyTorch reference of the learner's step, sharing no code with ebft.learner except
compute_rewards for whitened rewards: it builds the packed sequence, mask and positions with loops,
runs a float64 copy of the model, takes its own log-softmax, computes un-whitened rewards and RLOO
advantages from the formulas in docs/method.md section 4, broadcasts them to tokens itself, applies
the loss of section 5, and steps a torch AdamW with clipping and the warmup schedule.
"""

from __future__ import annotations

import torch
from helpers import exported, weights_of
from transformers import AutoModelForCausalLM

from ebft.config import RewardConfig, build_config
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch
from ebft.rewards import compute_rewards

T, C, S_, G, N_SAMPLES, D = 24, 4, 4, 4, 3, 16
NB = (T - G - C) // S_ + 1


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
        chunks.chunk_ids, torch.randn(docs, NB, N_SAMPLES, D, generator=gen), torch.randn(docs, NB, D, generator=gen)
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
    """[docs, n, NB] advantages of rollout_features [docs, NB, n, D], one (document, block) group at a time."""
    a, d = config.reward.alignment_coef, config.reward.diversity_coef
    docs, n = rollout_features.shape[0], rollout_features.shape[2]
    out = torch.zeros(docs, n, NB, dtype=torch.float64)
    for i in range(docs):
        for k in range(NB):
            X, y = rollout_features[i, k].double(), gt_features[i, k].double()
            if config.reward.whitening != "none":
                groups = compute_rewards(
                    X[None].float(),
                    y[None].float(),
                    RewardConfig(alignment_coef=a, diversity_coef=d, whitening=config.reward.whitening),
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


def float64_model(model_dir, weights: dict[str, torch.Tensor] | None = None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    if weights is not None:
        state = {k: v.double() for k, v in weights.items()}
        model.load_state_dict(state, strict=False)  # tied/untied: lm_head may be absent
    return model


def capture_gradients(learner) -> dict[str, torch.Tensor]:
    """Wraps an in-process LearnerRank's DeepSpeed `engine.step` so that, at every accumulation boundary, the
    full (reduced, unclipped) gradient of each parameter is copied into the returned dict before the update."""
    from deepspeed.utils import safe_get_full_grad

    engine, captured = learner.engine, {}
    step = engine.step

    def step_and_capture(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            # Collective under ZeRO 1-3: every rank calls it for every parameter.
            grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters() if p.requires_grad}
            captured.clear()
            captured.update({name: g.detach().float().cpu().clone() for name, g in grads.items()})
        return step(*args, **kwargs)

    engine.step = step_and_capture
    return captured


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
    updated = weights_of(exported(learner))
    for name, p in model.named_parameters():
        torch.testing.assert_close(updated[name].double(), p.detach(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
