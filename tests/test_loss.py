"""The EBFT loss against per-block forwards and plain loops."""

import math

import torch
from transformers import AutoModelForCausalLM

from ebft.layout import BlockPlan
from ebft.learner import loss as loss_module
from ebft.learner.loss import document_ce, ebft_loss, generated_logprobs


def test_generated_logprobs_and_ce_match_separate_forwards(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plan = BlockPlan(chunk_length=24, context_length=4, stride=4, block_length=4)
    torch.manual_seed(1)
    docs = torch.randint(3, 500, (2, 24))
    rollouts = torch.randint(3, 500, (2, plan.num_blocks, 4))
    packed = plan.pack(docs, rollouts[:, None])
    temperature = 0.7
    with torch.no_grad():
        logits = model(
            input_ids=packed,
            attention_mask=plan.attention_mask().expand(2, -1, -1, -1),
            position_ids=plan.position_ids.expand(2, -1),
        ).logits
        got = generated_logprobs(logits, packed, plan, temperature)[:, 0]
        got_ce = document_ce(logits, docs)
        for b in range(2):
            plain = model(input_ids=docs[b : b + 1]).logits[0].double()
            nll = [-torch.log_softmax(plain[i], -1)[docs[b, i + 1]] for i in range(23)]
            assert math.isclose(got_ce[b].item(), sum(nll).item() / 23, rel_tol=1e-5)
            for k in range(plan.num_blocks):
                prefix = docs[b, : 4 + 4 * k]
                seq = torch.cat([prefix, rollouts[b, k]])
                ref_logits = model(input_ids=seq[None]).logits[0].double() / temperature
                for t in range(4):
                    want = torch.log_softmax(ref_logits[len(prefix) - 1 + t], -1)[rollouts[b, k, t]]
                    assert abs(got[b, k, t].item() - want.item()) < 1e-5


def test_sliced_logprobs_keep_no_float_copy_of_the_logits_and_give_the_float64_gradient(monkeypatch):
    monkeypatch.setattr(loss_module, "LOGPROB_SLICE", 5)  # several slices, the last one short
    plan = BlockPlan(chunk_length=24, context_length=4, stride=4, block_length=4, samples=2)
    torch.manual_seed(2)
    B, V = 3, 50
    packed = plan.pack(torch.randint(0, V, (B, 24)), torch.randint(0, V, (B, 2, plan.num_blocks, 4)))
    logits = torch.randn(B, plan.packed_length, V, requires_grad=True)
    weights = torch.randn(B, 2, plan.num_blocks, 4, dtype=torch.float64)

    saved = []  # tensors autograd keeps for backward, other than the logits themselves
    keep = lambda t: saved.append(t.nbytes) if t.untyped_storage().data_ptr() != logits.data_ptr() else None  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(lambda t: keep(t) or t, lambda t: t):
        got = generated_logprobs(logits, packed, plan, 0.7)
        got_ce = document_ce(logits, packed[:, :24])
    # Far less than one float32 [B, positions, V] copy (or log-softmax) of the logits.
    assert sum(saved) < B * 16 * V * 4
    ((got.double() * weights).sum() + got_ce.double().sum()).backward()

    reference = logits.detach().double().requires_grad_()
    predicted = torch.log_softmax(reference[:, plan.predictor_indices] / 0.7, -1)  # [B, samples, NB, G, V]
    want = predicted.gather(-1, packed[:, plan.generated_indices].unsqueeze(-1)).squeeze(-1)
    want_ce = torch.stack(
        [-torch.log_softmax(reference[b, :23], -1)[torch.arange(23), packed[b, 1:24]].mean() for b in range(B)]
    )
    ((want * weights).sum() + want_ce.sum()).backward()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_ce.double(), want_ce, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits.grad.double(), reference.grad, atol=1e-6, rtol=0)


def reference_policy_loss(logprobs, advantages, behavior, stale, cap):
    B, NB, G = logprobs.shape
    total = 0.0
    for b in range(B):
        seq = 0.0
        for k in range(NB):
            for t in range(G):
                w = min(math.exp(logprobs[b, k, t] - behavior[b, k, t]), cap) if stale[b] else 1.0
                seq += w * advantages[b, k] * logprobs[b, k, t]
        total += seq / (NB * G)
    return -total / B


def test_policy_loss_weights_and_gradient():
    torch.manual_seed(0)
    B, NB, G = 3, 4, 2
    logprobs = (-torch.rand(B, NB, G, dtype=torch.float64) * 3).requires_grad_()
    behavior = logprobs.detach() + torch.randn(B, NB, G, dtype=torch.float64)
    advantages = torch.randn(B, NB, dtype=torch.float64)
    stale = torch.tensor([False, True, True])
    ce = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    terms = ebft_loss(
        logprobs,
        advantages,
        ce,
        rl_coef=1.0,
        ce_coef=0.1,
        behavior_logprobs=behavior,
        stale=stale,
        ratio_truncation=1.5,
    )
    want = reference_policy_loss(logprobs.detach(), advantages, behavior, stale, 1.5)
    assert math.isclose(terms.policy_loss.item(), want, rel_tol=1e-12)
    capped = sum(
        math.exp(logprobs[b, k, t].item() - behavior[b, k, t].item()) > 1.5
        for b in range(B)
        if stale[b]
        for k in range(NB)
        for t in range(G)
    )
    assert 0 < capped and math.isclose(terms.truncated_fraction.item(), capped / (B * NB * G), rel_tol=1e-6)
    assert math.isclose(terms.loss.item(), want + 0.1 * 3.0, rel_tol=1e-12)
    terms.loss.backward()
    # The weight is detached: d loss / d logp = -w * A / (NB * G * B).
    w = torch.where(stale.view(-1, 1, 1), (logprobs.detach() - behavior).exp().clamp(max=1.5), torch.ones(()))
    torch.testing.assert_close(logprobs.grad, -w * advantages.unsqueeze(-1) / (NB * G * B))


def test_fresh_rollouts_have_importance_weight_exactly_one():
    logprobs = -torch.rand(2, 3, 4)
    behavior = logprobs + 0.3  # the sampler's numerics differ; fresh rollouts must ignore that
    terms = ebft_loss(
        logprobs,
        torch.randn(2, 3),
        torch.zeros(2),
        rl_coef=1.0,
        ce_coef=0.0,
        behavior_logprobs=behavior,
        stale=torch.tensor([False, False]),
        ratio_truncation=1.0,
    )
    assert terms.importance_weight_mean.item() == 1.0 and terms.importance_weight_max.item() == 1.0
    assert terms.truncated_fraction.item() == 0.0  # a cap of 1 truncates no fresh token


def test_kl_term_is_the_k3_estimator():
    logprobs = -torch.rand(1, 2, 3, dtype=torch.float64)
    ref = -torch.rand(1, 2, 3, dtype=torch.float64)
    terms = ebft_loss(
        logprobs, torch.zeros(1, 2), torch.zeros(1), rl_coef=1.0, ce_coef=0.0, kl_coef=0.5, ref_logprobs=ref
    )
    pairs = zip(ref.flatten().tolist(), logprobs.flatten().tolist())
    want = sum(math.exp(r - lp) - (r - lp) - 1 for r, lp in pairs) / 6
    assert math.isclose(terms.kl.item(), want, rel_tol=1e-12)
    assert math.isclose(terms.loss.item(), 0.5 * want, rel_tol=1e-12)
