"""training.method=sft on the learner: one step equals a plain float64 PyTorch cross-entropy step."""

from __future__ import annotations

import pytest
import torch
from learner_reference import T, assert_weights_match, float64_model, make_config, reference_update

from ebft.learner.engine import LearnerRank
from ebft.messages import ChunkBatch

pytestmark = pytest.mark.usefixtures("one_thread")


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
