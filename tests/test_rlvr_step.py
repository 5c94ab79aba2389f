"""The learner's RLVR step (training.method = rlvr) against a float64 reference that shares no code with it: each
completion forwarded unpacked after its question, advantages and the loss by plain loops (docs/method.md section 10)."""

from __future__ import annotations

import pytest
import torch
from learner_reference import assert_gradients_match, capture_gradients, float64_model, make_config

from ebft.learner.engine import LearnerRank
from ebft.messages import CompletionBatch, PromptBatch, RewardBatch, VerifiableTask

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3
TEMPERATURE = 0.7


def rlvr_config():
    source = {"path": "questions.jsonl", "question_key": "q", "answer_key": "a", "references_key": "r"}
    return make_config(
        data={"sources": [source]},
        training={"method": "rlvr", "docs_per_step": 4, "steps": 10},
        rlvr={"completions_per_prompt": N, "reward": "chrf"},
        learner={"zero_stage": 0, "micro_batch_docs": 2, "gradient_checkpointing": False},
    )


def make_batches(version: int, stale_version: int):
    """Two shards of two questions each; the second shard sampled by older weights (stale)."""
    gen = torch.Generator().manual_seed(7)
    batches, rewards = [], []
    for shard, sampled_by in enumerate([version, stale_version]):
        ids = [2 * shard, 2 * shard + 1]

        def sequence(low: int, high: int) -> list[int]:
            length = int(torch.randint(low, high, (1,), generator=gen))
            return torch.randint(3, 500, (length,), generator=gen).tolist()

        prompts = [sequence(2, 7) for _ in ids]
        tokens = [[sequence(1, 6) for _ in range(N)] for _ in ids]  # completions of different lengths
        behavior = [[(-torch.rand(len(c), generator=gen) * 6).tolist() for c in group] for group in tokens]
        tasks = [VerifiableTask("q", references=("r",)) for _ in ids]
        batch = PromptBatch(ids, prompts, tasks, step=0)
        batches.append(CompletionBatch(batch, tokens, behavior, [["x"] * N for _ in ids], weight_version=sampled_by))
        reward = torch.rand(2, N, generator=gen)
        if shard == 1:
            reward[1] = 0.5  # a group of equal rewards: no signal
        rewards.append(RewardBatch(list(ids), reward, {"scored": 2 * N}))
    return batches, rewards


def reference_loss(model, batches, rewards, current_version, truncation):
    """-mean over completions of the token-mean of w * A * log pi, each completion forwarded after its question."""
    terms = []
    for batch, reward in zip(batches, rewards):
        for question, (prompt, group) in enumerate(zip(batch.prompts.prompts, batch.tokens)):
            r = [float(x) for x in reward.rewards[question]]
            equal = all(x == r[0] for x in r)
            for j, completion in enumerate(group):
                advantage = 0.0 if equal else r[j] - sum(r[k] for k in range(N) if k != j) / (N - 1)
                sequence = torch.tensor([prompt + completion])
                logits = model(input_ids=sequence).logits[0].double() / TEMPERATURE
                logp = torch.log_softmax(logits, dim=-1)
                token_terms = []
                for t, token in enumerate(completion):
                    lp = logp[len(prompt) - 1 + t, token]
                    weight = 1.0
                    if batch.weight_version != current_version:
                        behavior = batch.behavior_logprobs[question][j][t]
                        weight = min(float(torch.exp(lp.detach() - behavior)), truncation)
                    token_terms.append(weight * advantage * lp)
                terms.append(sum(token_terms) / len(completion))
    return -sum(terms) / len(terms)


@pytest.mark.slow
def test_rlvr_step_equals_an_unpacked_float64_reference(tiny_model_dir):
    config = rlvr_config()
    learner = LearnerRank(config, tiny_model_dir)
    gradients = capture_gradients(learner)
    model = float64_model(tiny_model_dir)
    batches, rewards = make_batches(version=0, stale_version=-1)
    metrics = learner.rlvr_step(batches, rewards, current_version=0)
    loss = reference_loss(model, batches, rewards, 0, config.loss.ratio_truncation)
    loss.backward()
    assert metrics["train/policy_loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert_gradients_match(gradients, model)
    assert metrics["train/equal_reward_fraction"] == pytest.approx(0.25)
    assert metrics["train/stale_fraction"] == pytest.approx(0.5)
    all_rewards = torch.cat([r.rewards for r in rewards])
    assert metrics["train/reward"] == pytest.approx(float(all_rewards.mean()))
    lengths = [len(c) for b in batches for group in b.tokens for c in group]
    assert metrics["train/completion_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    assert learner.weight_version == 1
    learner.close()


def test_rewards_of_other_questions_are_refused(tiny_model_dir):
    learner = LearnerRank(rlvr_config(), tiny_model_dir)
    batches, rewards = make_batches(version=0, stale_version=0)
    rewards[1].task_ids[0] = 99
    with pytest.raises(ValueError, match="question ids differ"):
        learner.rlvr_step(batches, rewards, current_version=0)
    learner.close()
