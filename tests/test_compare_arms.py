"""A compare's arms as run configs: each arm's own recipe, what they must share, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebft.cluster.compare import arm_config, seeds_of
from ebft.config import ConfigError, build_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
ARMS = [
    {"name": "ebft", "method": "ebft"},
    {"name": "sft_cos", "method": "sft", "overrides": {"optim.lr": 1e-5, "optim.schedule": "cosine"}},
]


def test_each_arm_gets_its_own_recipe_and_every_run_its_own_folder():
    config = build_config({"training": {"output_dir": "cmp", "seed": 3}, "compare": {"arms": ARMS, "seeds": [3, 4]}})
    runs = {(arm.name, seed): arm_config(config, arm, seed) for arm in config.compare.arms for seed in seeds_of(config)}
    assert {key: (c.optim.lr, c.optim.schedule, c.training.method) for key, c in runs.items()} == {
        ("ebft", 3): (1e-6, "constant", "ebft"),
        ("ebft", 4): (1e-6, "constant", "ebft"),
        ("sft_cos", 3): (1e-5, "cosine", "sft"),
        ("sft_cos", 4): (1e-5, "cosine", "sft"),
    }
    assert {key: c.training.seed for key, c in runs.items()} == {key: key[1] for key in runs}
    folders = [Path(c.training.output_dir) for c in runs.values()]
    assert len(set(folders)) == 4 and all(folder.parent == Path("cmp") for folder in folders)
    # Only the reference arm's first seed evaluates the base; every run shares the held-out selection.
    assert [key for key, c in runs.items() if c.eval.at_start] == [("ebft", 3)]
    assert len({c.eval.model_dump_json() for c in runs.values() if not c.eval.at_start}) == 1


def test_what_arms_must_share_is_refused_before_anything_runs():
    for key in ("data.chunk_length", "eval.seed", "training.steps", "training.seed", "model.policy"):
        with pytest.raises(ConfigError, match="shared by every arm"):
            build_config({"compare": {"arms": [{"name": "a", "method": "sft", "overrides": {key: 1}}, ARMS[0]]}})
    with pytest.raises(ConfigError, match="distinct names"):
        build_config({"compare": {"arms": [ARMS[0], ARMS[0]]}})
    with pytest.raises(ConfigError, match="not an arm"):
        build_config({"compare": {"arms": ARMS, "reference": "rlvr"}})
    config = build_config({"compare": {"arms": [ARMS[0], {**ARMS[1], "overrides": {"optim.lrr": 1e-5}}]}})
    with pytest.raises(ConfigError, match="(?s)sft_cos .*did you mean `optim.lr`"):
        arm_config(config, config.compare.arms[1], 0)
    config = build_config({"compare": {"arms": ARMS, "budget": "compute"}})
    with pytest.raises(ConfigError, match="cosine schedule spans training.steps"):
        arm_config(config, config.compare.arms[1], 0, machine_budget_s=10.0)


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_shipped_config_builds_every_run_of_its_compare(path):
    config = load_config(path)
    for arm in config.compare.arms:
        for seed in seeds_of(config):
            run = arm_config(config, arm, seed)
            assert run.training.method == arm.method and run.training.seed == seed


def test_an_arm_keeps_its_own_warmup_steps_over_a_compute_budget():
    from ebft.learner.deepspeed_setup import lr_factor

    sft = {"name": "sft", "method": "sft", "overrides": {"optim.warmup_fraction": 0.25}}
    config = build_config({"training": {"steps": 20}, "compare": {"budget": "compute", "arms": [ARMS[0], sft]}})
    run = arm_config(config, config.compare.arms[1], 0, machine_budget_s=5.0)
    # ceil(0.25 * 20) = 5 warmup steps, as the arm would have at equal steps, though it may now train 50 times longer.
    assert run.training.steps == 1000
    assert [lr_factor(i, run) for i in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0], rel=1e-12)
