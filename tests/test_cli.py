"""The `ebft` command line: parsing, dispatch to lazily imported implementations, clean errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import tiny_run_config

from ebft import cli


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  steps: 5\n")
    return path


def install_fake(monkeypatch, module_name, function_name):
    """Put a recording stand-in for an implementation module in place; returns the list of its calls."""
    calls = []
    module = types.ModuleType(module_name)
    setattr(module, function_name, lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setitem(sys.modules, module_name, module)
    return calls


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("models", "train", "compare", "submit", "eval"))


def test_train_parses_config_overrides_and_resume(monkeypatch, config_file):
    calls = install_fake(monkeypatch, "ebft.cluster.train", "run")
    monkeypatch.setattr("ebft.cluster.report.print_summary", lambda summary: None)
    assert cli.main(["train", str(config_file), "training.steps=7", "sampling.temperature=0.5", "--resume"]) == 0
    (config,), kwargs = calls[0]
    assert config.training.steps == 7 and config.sampling.temperature == 0.5 and kwargs == {"resume": True}


def test_submit_and_eval_dispatch(monkeypatch, config_file):
    submitted = install_fake(monkeypatch, "ebft.cluster.submit", "main_submit")
    evaluated = install_fake(monkeypatch, "ebft.evaluation.checkpoint_eval", "run")
    cli.main(["submit", str(config_file), "training.steps=3", "--address", "http://127.0.0.1:8265"])
    assert submitted[0] == (
        (str(config_file), ["training.steps=3"]),
        {"address": "http://127.0.0.1:8265", "resume": False, "command": "train"},
    )
    cli.main(["submit", str(config_file), "--compare", "--address", "http://127.0.0.1:8265"])
    assert submitted[1][1]["command"] == "compare"
    assert cli.main(["eval", "runs/x", "--config", str(config_file)]) == 0
    (model, config), kwargs = evaluated[0]
    assert model == "runs/x" and config.training.steps == 5 and kwargs == {"output": None, "against": None}


def test_compare_dispatch(monkeypatch, config_file):
    compared = install_fake(monkeypatch, "ebft.cluster.compare", "compare")
    assert cli.main(["compare", str(config_file), "training.steps=4", "training.method=sft"]) == 0
    (config,), _ = compared[0]
    assert config.training.steps == 4 and config.compare.budget == "steps"
    assert cli.main(["compare", str(config_file), "--budget", "compute", "training.steps=3"]) == 0
    (config,), _ = compared[1]
    assert config.compare.budget == "compute" and config.training.steps == 3  # overrides after an option count
    with pytest.raises(SystemExit):
        cli.main(["compare", str(config_file), "--budget", "compute", "--bogus"])


def test_config_errors_print_cleanly(config_file, capsys):
    assert cli.main(["train", str(config_file), "sampling.temprature=0.5"]) == 2
    err = capsys.readouterr().err
    assert "sampling.temperature" in err and "Traceback" not in err
    assert cli.main(["train", str(config_file.parent / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_models_prepare_prints_the_path(monkeypatch, tmp_path, capsys):
    import ebft.model_sources

    monkeypatch.setattr(ebft.model_sources, "prepare_smollm2", lambda cache_dir, progress: Path(cache_dir) / "smollm2")
    assert cli.main(["models", "prepare", "smollm2", "--cache-dir", str(tmp_path), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "smollm2")


def test_console_script_runs_without_traceback(config_file):
    result = subprocess.run(
        [sys.executable, "-m", "ebft.cli", "train", str(config_file), "data.chunk_length=13"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "data.chunk_length" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("to", ["group", "every process"])
def test_sigterm_stops_a_local_run_as_ctrl_c_does(tiny_model_with_tokenizer, tmp_path, to):
    """`timeout` and a batch scheduler's cancel send SIGTERM to the whole process group of `ebft train`, which holds
    the local Ray cluster it started: the run still finishes its step, saves a checkpoint and leaves nothing running.
    A service manager or a scheduler that signals every process of the job ends Ray's processes too: the run then
    restarts nothing, says what `--resume` continues from (no checkpoint yet here) and exits at once."""
    from ebft.learner.checkpoint import checkpoint_path, latest_checkpoint

    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_with_tokenizer, run_dir, training={"steps": 40})))
    log = tmp_path / "train.log"
    with log.open("w") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "ebft.cli", "train", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as under `timeout` or a batch job
        )
    metrics = run_dir / "metrics.jsonl"

    def trained_steps() -> list[int]:
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        return [row["step"] for row in rows if "train/policy_loss" in row]

    try:
        deadline = time.monotonic() + 600
        while not trained_steps() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert trained_steps(), log.read_text()[-3000:]
        started = psutil.Process(driver.pid).children(recursive=True)
        assert any("raylet" in process.name() for process in started)  # the run started its own Ray cluster
        signalled = time.monotonic()
        if to == "group":
            os.killpg(driver.pid, signal.SIGTERM)
            time.sleep(0.5)
            os.kill(driver.pid, signal.SIGTERM)  # `timeout` sends it to the group and to its child: one stop still
        else:
            for process in [psutil.Process(driver.pid), *started]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGTERM)
        returncode = driver.wait(timeout=300)
        exited_after = time.monotonic() - signalled
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = log.read_text()
    assert "a learner rank died" not in text, text[-3000:]  # no restart during a requested stop
    if to == "group":
        steps = trained_steps()
        assert returncode == 0 and steps == list(range(len(steps))) and len(steps) < 40, text[-3000:]
        assert latest_checkpoint(run_dir / "checkpoints") == checkpoint_path(run_dir / "checkpoints", len(steps))
        assert "actor restarts: 0" in text
    else:
        assert returncode == 1 and "a pool failed during the requested stop" in text, text[-3000:]
        assert "no checkpoint was saved" in text
        assert exited_after < 50, exited_after  # it waited 60 s on the dead GCS, then Ray ended it
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [process.name() for process in alive]
