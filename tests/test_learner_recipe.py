"""The learner's optimizer recipe: the LR schedule (optim.schedule) and the policy's moving average (training.ema)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import exported, weights_of
from learner_reference import make_batch, make_config
from transformers import AutoModelForCausalLM

from ebft.learner import checkpoint as ckpt
from ebft.learner.engine import LearnerRank

pytestmark = pytest.mark.usefixtures("one_thread")


def cosine_lrs(lr: float, steps: int, warmup: int, floor: float) -> list[float]:
    """The LR of each step by hand: linear warmup reaching lr at step warmup - 1, then a half cosine over the
    remaining steps that ends at floor * lr on the last one."""
    lrs = []
    for step in range(steps):
        if step < warmup:
            lrs.append(lr * (step + 1) / warmup)
        else:
            angle = math.pi * (step + 1 - warmup) / (steps - warmup)
            lrs.append(lr * floor + lr * (1 - floor) * (1 + math.cos(angle)) / 2)
    return lrs


@pytest.mark.slow
def test_cosine_schedule_reaches_its_formula_at_every_step_across_a_resume(tiny_model_dir, tmp_path):
    steps, lr, floor = 7, 1e-3, 0.1
    # ceil(0.25 * 7) = 2 warmup steps
    config = make_config(optim={"lr": lr, "warmup_fraction": 0.25, "schedule": "cosine", "min_lr_fraction": floor})
    config = config.model_copy(update={"training": config.training.model_copy(update={"steps": steps})})
    expected = cosine_lrs(lr, steps, warmup=2, floor=floor)
    assert expected[1] == lr and expected[-1] == pytest.approx(floor * lr, rel=1e-12)

    learner, reached = LearnerRank(config, tiny_model_dir), []
    for step in range(4):
        rollouts, features = make_batch(4, seed=step, version=step)
        reached.append(learner.train_step([rollouts], [features], current_version=step)["train/lr"])
    learner.save_checkpoint(ckpt.checkpoint_path(tmp_path, 4))
    learner.close()
    resumed = LearnerRank(config, tiny_model_dir)
    resumed.load_checkpoint(ckpt.checkpoint_path(tmp_path, 4))
    for step in range(4, steps):
        rollouts, features = make_batch(4, seed=step, version=step)
        reached.append(resumed.train_step([rollouts], [features], current_version=step)["train/lr"])
    resumed.close()
    assert reached == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_moving_average_follows_a_float64_loop_and_resumes_exactly(tiny_model_dir, tmp_path, stage):
    decay, steps, saved_at = 0.7, 4, 2
    config = make_config(training={"ema": decay}, learner={"zero_stage": stage})
    batches = [make_batch(4, seed=50 + step, version=step, first_chunk=4 * step) for step in range(steps)]
    learner = LearnerRank(config, tiny_model_dir)
    reference = {name: tensor.double() for name, tensor in weights_of(exported(learner)).items()}
    for step, (rollouts, features) in enumerate(batches):
        learner.train_step([rollouts], [features], current_version=step)
        for name, tensor in weights_of(exported(learner)).items():
            reference[name] = decay * reference[name] + (1 - decay) * tensor.double()
        if step + 1 == saved_at:
            learner.save_checkpoint(ckpt.checkpoint_path(tmp_path, saved_at))
    average = learner.ema_state_dict()
    live = weights_of(exported(learner))
    learner.close()
    assert set(average) == set(reference)
    for name, tensor in average.items():
        torch.testing.assert_close(tensor.double(), reference[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    # It is not the live policy: after 4 steps at decay 0.7 a quarter of the start is still in it.
    assert max(float((average[n] - live[n]).abs().max()) for n in live) > 1e-4

    # The checkpoint holds the average at its step as an HF model; resumed there, the same steps give the same average.
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / f"step_{saved_at:08d}" / ckpt.EMA_DIR, dtype=torch.float32)
    resumed = LearnerRank(config, tiny_model_dir)
    resumed.load_checkpoint(ckpt.checkpoint_path(tmp_path, saved_at))
    assert all(torch.equal(saved.state_dict()[n], t) for n, t in resumed.ema_state_dict().items())
    for step in range(saved_at, steps):
        rollouts, features = batches[step]
        resumed.train_step([rollouts], [features], current_version=step)
    assert all(torch.equal(tensor, average[name]) for name, tensor in resumed.ema_state_dict().items())
    resumed.close()


@pytest.mark.slow
def test_moving_average_sharded_over_two_zero3_ranks_is_the_one_rank_average(tiny_model_dir, local_ray, tmp_path):
    from ebft.learner.group import LearnerGroup

    config = make_config(training={"ema": 0.6}, learner={"zero_stage": 3, "micro_batch_docs": 1})
    sharded = config.model_copy(update={"resources": make_config(resources={"learner": {"num_actors": 2}}).resources})
    batches = [
        (make_batch(2, seed=60 + s, version=s), make_batch(2, seed=70 + s, version=s, first_chunk=2)) for s in (0, 1)
    ]
    single = LearnerRank(config.model_copy(update={"learner": sharded.learner}), tiny_model_dir)
    for step, (first, second) in enumerate(batches):
        single.train_step([first[0], second[0]], [first[1], second[1]], current_version=step)
    expected = single.ema_state_dict()
    single.close()
    with LearnerGroup(sharded, tiny_model_dir) as group:
        for step, (first, second) in enumerate(batches):
            group.train_step([first[0], second[0]], [first[1], second[1]], current_version=step)
        path = group.save_checkpoint(str(ckpt.checkpoint_path(tmp_path, 2)))
    # Each rank saved its own partition; the HF folder is their average put together.
    assert sorted(p.name for p in Path(path).glob("ema_rank*.pt")) == ["ema_rank0.pt", "ema_rank1.pt"]
    saved = AutoModelForCausalLM.from_pretrained(Path(path) / ckpt.EMA_DIR, dtype=torch.float32).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
