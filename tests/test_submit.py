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
from helpers import tiny_run_config

from ebft.cluster.submit import submit

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_the_head_accepts_jobs(head: subprocess.Popen, address: str, log: Path) -> None:
    from urllib.request import urlopen

    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 180
    while "Ray runtime started" not in log.read_text():
        assert head.poll() is None, log.read_text()[-4000:]
        assert time.time() < deadline, "the Ray head did not start in 180 s"
        time.sleep(1)
    urlopen(f"{address}/api/version", timeout=30).read()
    # The job agent registers a little after that; until it has, submissions answer "No available agent".
    client = JobSubmissionClient(address)
    while True:
        try:
            client.submit_job(entrypoint="true")
            return
        except RuntimeError as error:
            assert "No available agent" in str(error) and time.time() < deadline, error
            time.sleep(2)


@pytest.fixture
def ray_head(tmp_path):
    """A head of our own on loopback, on free ports, so it runs beside any other Ray cluster on the machine.
    `--block` keeps `ray start` in the foreground: stopping it stops exactly this head's processes (`ray stop`
    would stop every Ray cluster on the machine, a user's runs included)."""
    ports = {
        "port": free_port(),
        "dashboard-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
        "ray-client-server-port": free_port(),
    }
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
    command += [f"--{name}={port}" for name, port in ports.items()]
    command += ["--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true"]
    # Token auth off for this loopback head: its client would otherwise depend on which auth mode this pytest
    # process's Ray happened to cache first.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "ray_head.log"
    with log.open("w") as output:
        head = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_until_the_head_accepts_jobs(head, address, log)
        yield address
    finally:
        head.terminate()  # `ray start --block` stops every process it started on SIGTERM
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()


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
