"""Block-sparse attention for the packed layout equals the dense packed mask: logits, log-probs and gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from ebft import packed_attention
from ebft.layout import BlockPlan
from ebft.learner.loss import document_ce, generated_logprobs


def _loss_and_grads(model, packed, plan, **attention):
    model.zero_grad(set_to_none=True)
    positions = plan.position_ids.expand(packed.shape[0], -1)
    logits = model(input_ids=packed, position_ids=positions, use_cache=False, **attention).logits
    logprobs = generated_logprobs(logits, packed, plan, 0.7)
    ce = document_ce(logits, packed[:, : plan.chunk_length])
    weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)
    (ce.sum() + (weights * logprobs).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), logprobs.detach(), grads


# (T, C, s, G, n): one block per group, uneven strides, and 4 blocks per group with the last group padded.
@pytest.mark.parametrize("geometry", [(24, 4, 4, 4, 3), (20, 2, 3, 3, 2), (72, 2, 2, 2, 2)])
def test_blocks_attention_equals_the_dense_packed_mask(tiny_model_dir, geometry):
    T, C, s, G, n = geometry
    plan = replace(BlockPlan(T, C, s, G), samples=n)
    assert packed_attention.blocks_per_group(plan) == (4 if T == 72 else 1)
    gen = torch.Generator().manual_seed(0)
    docs = torch.randint(3, 500, (2, T), generator=gen)
    packed = plan.pack(docs, torch.randint(3, 500, (2, n, plan.num_blocks, G), generator=gen))

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    blocks = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=packed_attention.register()
    )
    want = _loss_and_grads(dense, packed, plan, attention_mask=plan.attention_mask(torch.float32))
    got = _loss_and_grads(blocks, packed, plan, block_plan=plan)

    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[2].keys() == want[2].keys() and len(want[2]) > 0
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_blocks_attention_without_a_plan_is_causal(tiny_model_dir):
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    blocks = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=packed_attention.register()
    )
    tokens = torch.randint(3, 500, (2, 17), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(blocks(input_ids=tokens).logits, dense(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
