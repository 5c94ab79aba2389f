"""`ebft submit` of a tiny job to a Ray head started on 127.0.0.1: it trains, and `ray job stop` checkpoints it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config

from ebft.cluster.submit import submit

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(monkeypatch):
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--disable-usage-stats",
            "--include-dashboard=true",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    # The head may require token authentication; the client then must ask for it.
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "token"))
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submitted_tiny_job_trains_and_ray_job_stop_checkpoints_it(ray_head, tiny_model_with_tokenizer, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = tiny_run_config(
        tiny_model_with_tokenizer, tmp_path / "run", data={"max_examples": 8, "heldout_fraction": 0.0}
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    job_id = submit(str(path), ["training.steps=50"], address=ray_head)  # the override is what runs
    client = JobSubmissionClient(ray_head)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and "train/policy_loss" in metrics.read_text()):
        assert client.get_job_status(job_id) in {JobStatus.PENDING, JobStatus.RUNNING}, client.get_job_logs(job_id)[
            -4000:
        ]
        time.sleep(1)
    assert client.stop_job(job_id)  # SIGTERM: the job finishes its step and saves a checkpoint
    while time.time() < deadline and not client.get_job_status(job_id).is_terminal():
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    trained = metrics.read_text().count("train/policy_loss")
    assert 1 <= trained < 50, logs[-4000:]
    checkpoints = sorted(folder.name for folder in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoints[-1] == f"step_{trained:08d}", logs[-4000:]
    assert "stopped early" in logs
