"""The learner's optimizer recipe: the LR schedule (optim.schedule) and the policy's moving average (training.ema)."""

from __future__ import annotations

import math

import pytest
from learner_reference import make_batch, make_config

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
