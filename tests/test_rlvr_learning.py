"""The RLVR pieces together: leave-one-out advantages and the packed loss raise a verifiable reward of a tiny
random model in a few steps, and do not when the rewards are shuffled across completions."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_VOCAB, make_tiny_llama
from transformers import AutoModelForCausalLM

from ebft.rlvr.advantages import leave_one_out_advantages
from ebft.rlvr.loss import completion_logprobs, pack_prompt_groups, rlvr_loss

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
TARGET_TOKENS = TINY_VOCAB // 8  # the reward: the fraction of a completion's tokens below this id
LENGTH, SAMPLES, STEPS = 6, 8, 20


def sample(model, n: int, generator: torch.Generator) -> list[list[list[int]]]:
    completions = []
    with torch.no_grad():
        for prompt in PROMPTS:
            tokens = torch.tensor([prompt] * n)
            for _ in range(LENGTH):
                probs = torch.softmax(model(input_ids=tokens).logits[:, -1].float(), dim=-1)
                tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
            completions.append(tokens[:, len(prompt) :].tolist())
    return completions


def reward(completion: list[int]) -> float:
    return sum(token < TARGET_TOKENS for token in completion) / len(completion)


def mean_reward(model) -> float:
    groups = sample(model, 32, torch.Generator().manual_seed(99))
    return sum(reward(c) for group in groups for c in group) / sum(len(group) for group in groups)


def train(model_dir, shuffle: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    before = mean_reward(model)
    for _ in range(STEPS):
        completions = sample(model, SAMPLES, generator)
        rewards = torch.tensor([[reward(c) for c in group] for group in completions])
        if shuffle:
            rewards = rewards.flatten()[torch.randperm(rewards.numel(), generator=generator)].view_as(rewards)
        packed = pack_prompt_groups(PROMPTS, completions)
        logits = model(
            input_ids=packed.tokens, attention_mask=packed.attention_mask(), position_ids=packed.position_ids
        ).logits
        terms = rlvr_loss(completion_logprobs(logits, packed), leave_one_out_advantages(rewards).advantages, packed)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    return before, mean_reward(model)


@pytest.mark.slow
def test_reward_rises_under_rlvr_and_not_with_shuffled_rewards(tmp_path, one_thread):
    model_dir = make_tiny_llama(tmp_path, layers=2)
    before, after = train(model_dir, shuffle=False)
    assert after > before + 0.5, (before, after)
    before_shuffled, after_shuffled = train(model_dir, shuffle=True)
    assert before_shuffled == before
    assert after_shuffled < before + 0.15, (before, after_shuffled)
