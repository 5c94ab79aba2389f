"""The packed layout: one forward over all blocks equals NB separate causal forwards."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ebft.layout import BlockPlan


def test_block_plan_geometry_matches_the_method():
    plan = BlockPlan(chunk_length=1024, context_length=8, stride=8, block_length=8)
    assert plan.num_blocks == 127
    doc = torch.arange(1024)
    prompts = plan.prompts(doc)
    gt = doc[plan.window_indices]
    for k in range(plan.num_blocks):
        assert torch.equal(prompts[k], doc[: 8 + 8 * k])
        assert torch.equal(gt[k], doc[8 + 8 * k : 16 + 8 * k])
    assert BlockPlan(1024, 4, 2, 4).num_blocks == 509
    with pytest.raises(ValueError, match="multiple of s"):
        BlockPlan(1023, 8, 8, 8)
    with pytest.raises(ValueError, match=r"must all be >= 1.*'C': 0"):
        BlockPlan(1024, 0, 8, 8)  # block 0 would have no prompt token to predict it from


@pytest.mark.parametrize("samples", [1, 2])
def test_packed_mask_and_positions_match_a_loop_construction(samples):
    plan = BlockPlan(chunk_length=14, context_length=3, stride=2, block_length=3, samples=samples)
    T, NB, G, S = 14, plan.num_blocks, 3, plan.packed_length
    assert S == T + samples * NB * G
    expected = torch.zeros(S, S, dtype=torch.bool)
    positions = list(range(T)) + [0] * (samples * NB * G)
    for i in range(T):
        expected[i, : i + 1] = True
    for j in range(samples):
        for k in range(NB):
            for t in range(G):
                q = T + j * NB * G + t * NB + k
                assert plan.generated_indices[j, k, t] == q
                assert plan.predictor_indices[j, k, t] == (3 + 2 * k - 1 if t == 0 else q - NB)
                positions[q] = 3 + 2 * k + t
                expected[q, : 3 + 2 * k] = True
                for u in range(t + 1):
                    expected[q, T + j * NB * G + u * NB + k] = True
    assert torch.equal(plan.allowed, expected)
    assert plan.position_ids.tolist() == positions


def test_pack_refuses_rollouts_of_the_wrong_shape():
    plan = BlockPlan(chunk_length=14, context_length=3, stride=2, block_length=3, samples=2)
    with pytest.raises(ValueError, match="samples=2"):
        plan.pack(torch.zeros(14, dtype=torch.long), torch.zeros(3, plan.num_blocks, 3, dtype=torch.long))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("samples", [1, 3])
def test_one_packed_forward_equals_separate_block_forwards(tiny_model_dir, attn, samples):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32).eval()
    plan = BlockPlan(chunk_length=40, context_length=8, stride=4, block_length=4, samples=samples)
    torch.manual_seed(0)
    docs = torch.randint(3, 500, (2, 40))
    rollouts = torch.randint(3, 500, (2, samples, plan.num_blocks, 4))
    packed = plan.pack(docs, rollouts)
    with torch.no_grad():
        out = model(
            input_ids=packed,
            attention_mask=plan.attention_mask().expand(2, -1, -1, -1),
            position_ids=plan.position_ids.expand(2, -1),
            output_hidden_states=True,
        )
        for b in range(2):
            for j in range(samples):
                for k in range(plan.num_blocks):
                    sequence = torch.cat([plan.prompts(docs[b])[k], rollouts[b, j, k]])
                    ref = model(input_ids=sequence[None], output_hidden_states=True)
                    P = int(plan.prefix_lengths[k])
                    rows = plan.generated_indices[j, k]
                    torch.testing.assert_close(out.logits[b, rows], ref.logits[0, P:], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(out.logits[b, :P], ref.logits[0, :P], atol=1e-5, rtol=1e-5)
                    for layer in (0, 2, 4):
                        torch.testing.assert_close(
                            out.hidden_states[layer][b, rows], ref.hidden_states[layer][0, P:], atol=1e-5, rtol=1e-5
                        )
