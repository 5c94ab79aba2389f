"""The RLVR loss on a packed row (one prompt + its n completions) against separate float64 forwards of
prompt + completion_j, with the loss written out per sequence."""

from __future__ import annotations

import pytest
import torch
from learner_reference import float64_model

from ebft.rlvr.loss import completion_logprobs, pack_prompt_groups, rlvr_loss

TEMPERATURE, TRUNCATION = 0.8, 2.0


@pytest.fixture(scope="module")
def groups():
    """Two prompts of different lengths, three completions each of different lengths (so rows pad)."""
    gen = torch.Generator().manual_seed(0)
    prompt_lengths, completion_lengths = [3, 6], [[4, 1, 6], [2, 5, 3]]
    prompts = [torch.randint(3, 500, (P,), generator=gen).tolist() for P in prompt_lengths]
    completions = [[torch.randint(3, 500, (L,), generator=gen).tolist() for L in row] for row in completion_lengths]
    advantages = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    # Offsets of the behaviour log-probs from the current ones: ratios exp(-u) from 0.2 to 5, some truncated.
    offsets = [
        [torch.empty(len(c), dtype=torch.float64).uniform_(-1.6, 1.6, generator=gen) for c in row]
        for row in completions
    ]
    stale = torch.tensor([[True, False, True], [True, True, False]])
    return prompts, completions, advantages, offsets, stale


def separate_logprobs(model, prompt, completion):
    """log pi(completion token t | prompt + completion[:t]) [L], float64, from one causal forward."""
    tokens = torch.tensor(prompt + completion)
    logits = model(input_ids=tokens[None]).logits[0]
    logp = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    P = len(prompt)
    return torch.stack([logp[P - 1 + t, completion[t]] for t in range(len(completion))])


def reference_loss(model, ref_model, groups, kl_coef, with_staleness):
    prompts, completions, advantages, offsets, stale = groups
    pg, kl, weights, truncated = [], [], [], []
    for i, (prompt, row) in enumerate(zip(prompts, completions)):
        for j, completion in enumerate(row):
            logp = separate_logprobs(model, prompt, completion)
            weight = torch.ones_like(logp)
            if with_staleness and stale[i, j]:
                behavior = logp.detach() + offsets[i][j]
                ratio = (logp.detach() - behavior).exp()
                weight = ratio.clamp(max=TRUNCATION)
                truncated += (ratio > TRUNCATION).tolist()
            else:
                truncated += [False] * len(completion)
            weights += weight.tolist()
            pg.append((weight * advantages[i, j] * logp).mean())
            with torch.no_grad():
                ref = separate_logprobs(ref_model, prompt, completion)
            delta = ref - logp
            kl.append((delta.exp() - delta - 1).mean())
    loss = -torch.stack(pg).mean() + kl_coef * torch.stack(kl).mean()
    return loss, torch.tensor(weights, dtype=torch.float64), torch.tensor(truncated)


def packed_loss(model, ref_model, groups, kl_coef, with_staleness):
    prompts, completions, advantages, offsets, stale = groups
    packed = pack_prompt_groups(prompts, completions)
    mask = packed.attention_mask(torch.float64)
    logits = model(input_ids=packed.tokens, attention_mask=mask, position_ids=packed.position_ids).logits
    logprobs = completion_logprobs(logits, packed, TEMPERATURE)
    with torch.no_grad():
        ref_logits = ref_model(input_ids=packed.tokens, attention_mask=mask, position_ids=packed.position_ids).logits
        ref_logprobs = completion_logprobs(ref_logits, packed, TEMPERATURE)
    behavior = None
    if with_staleness:
        # The behaviour log-probs as the rollout actors report them: per completion token.
        current = [[separate_logprobs(model, p, c).detach() for c in row] for p, row in zip(prompts, completions)]
        behavior = packed.per_target([[cur + off for cur, off in zip(*pair)] for pair in zip(current, offsets)])
    terms = rlvr_loss(
        logprobs,
        advantages,
        packed,
        kl_coef=kl_coef,
        behavior_logprobs=behavior,
        stale=stale if with_staleness else None,
        ratio_truncation=TRUNCATION,
        ref_logprobs=ref_logprobs,
    )
    return terms, logprobs, packed


@pytest.mark.parametrize("kl_coef,with_staleness", [(0.0, False), (0.3, True)], ids=["on-policy", "stale+kl"])
def test_loss_and_gradient_match_separate_forwards(
    tiny_model_dir, tiny_tied_model_dir, groups, kl_coef, with_staleness
):
    ref_model = float64_model(tiny_tied_model_dir).eval()
    reference_model, packed_model = float64_model(tiny_model_dir).eval(), float64_model(tiny_model_dir).eval()
    expected, weights, truncated = reference_loss(reference_model, ref_model, groups, kl_coef, with_staleness)
    expected.backward()
    terms, _, _ = packed_loss(packed_model, ref_model, groups, kl_coef, with_staleness)
    terms.loss.backward()

    torch.testing.assert_close(terms.loss.double(), expected.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(terms.importance_weight_mean.double(), weights.mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(terms.importance_weight_max.double(), weights.max(), atol=1e-6, rtol=0)
    assert terms.truncated_fraction.item() == pytest.approx(truncated.double().mean().item())
    if with_staleness:
        assert 0 < truncated.sum() < len(truncated)  # the truncation is exercised, not everywhere
    expected_grads = dict(reference_model.named_parameters())
    for name, param in packed_model.named_parameters():
        torch.testing.assert_close(
            param.grad, expected_grads[name].grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}"
        )


def test_packed_logprobs_are_each_completions_own(tiny_model_dir, groups):
    model = float64_model(tiny_model_dir).eval()
    prompts, completions = groups[0], groups[1]
    with torch.no_grad():
        _, logprobs, packed = packed_loss(model, model, groups, 0.0, False)
        for i, (prompt, row) in enumerate(zip(prompts, completions)):
            expected = torch.cat([separate_logprobs(model, prompt, c) for c in row])
            torch.testing.assert_close(logprobs[i, : expected.numel()].double(), expected, atol=1e-6, rtol=0)
            assert (logprobs[i, expected.numel() :] == 0).all()
            assert (packed.completion[i, expected.numel() :] == -1).all()


def test_uneven_groups_and_empty_completions_are_refused():
    with pytest.raises(ValueError):
        pack_prompt_groups([[1, 2], [3]], [[[4], [5]], [[6]]])
    with pytest.raises(ValueError):
        pack_prompt_groups([[1, 2]], [[[4], []]])
    with pytest.raises(ValueError):
        pack_prompt_groups([[1, 2]], [[[4]], [[5]]])
