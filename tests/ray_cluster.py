"""A Ray cluster of our own on 127.0.0.1: a head and worker nodes started with `ray start`, as on real machines.

Every node gets free ports and a temp dir of its own, so it runs beside any other Ray cluster on the
machine and unpacks a job's working_dir where no other node replaces it under it (real machines each
have a disk). `--block` keeps each `ray start` in the foreground: stopping it stops exactly that node's
processes (`ray stop` would stop every Ray cluster on the machine, a user's runs included), and SIGKILL
to it and everything below it is a node that died with its actors, as a pre-empted machine would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# Token auth off for these loopback nodes: a client would otherwise depend on which auth mode this pytest
# process's Ray happened to cache first.
NODE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
NODE_PORTS = AGENT_PORTS + ("node-manager-port", "object-manager-port", "metrics-export-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.temp_root = Path(tempfile.mkdtemp(prefix="ebft-ray-"))  # short: Ray's socket paths live below it
        self.port, self.dashboard_port = free_port(), free_port()
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, *, num_cpus: int, resources: dict[str, float], timeout_s: float = 180) -> None:
        options = {"port": self.port, "dashboard-port": self.dashboard_port, "ray-client-server-port": free_port()}
        command = ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
        self.head = self._start(command, options, num_cpus, resources, "head")
        self._wait_started(self.head, self.log_dir / "head.log", timeout_s)

    def add_node(self, *, num_cpus: int, resources: dict[str, float], timeout_s: float = 180) -> subprocess.Popen:
        """A worker node that joins the head; returns its `ray start` process (see kill_node)."""
        name = f"node-{len(self.workers) + 1}"
        node = self._start([f"--address={self.gcs_address}"], {}, num_cpus, resources, name)
        self._wait_started(node, self.log_dir / f"{name}.log", timeout_s)
        self.workers.append(node)
        return node

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL the node's raylet and every process on it, at once."""
        import psutil

        processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        node.wait(timeout=30)

    def shutdown(self) -> None:
        for node in [*self.workers, self.head]:
            if node is None or node.poll() is not None:
                continue
            node.terminate()  # `ray start --block` stops every process it started on SIGTERM
            try:
                node.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.kill_node(node)
        shutil.rmtree(self.temp_root, ignore_errors=True)

    def _start(self, command, options, num_cpus, resources, name) -> subprocess.Popen:
        options = {**options, **{port: free_port() for port in NODE_PORTS}}
        command = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", *command]
        command += [f"--{option}={value}" for option, value in options.items()]
        command += [f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}", "--disable-usage-stats"]
        command += [f"--temp-dir={self.temp_root / name}"]
        with (self.log_dir / f"{name}.log").open("w") as output:
            return subprocess.Popen(command, env={**os.environ, **NODE_ENV}, stdout=output, stderr=subprocess.STDOUT)

    @staticmethod
    def _wait_started(node: subprocess.Popen, log: Path, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while "Ray runtime started" not in log.read_text():
            assert node.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, f"the Ray node did not start in {timeout_s:.0f} s: {log}"
            time.sleep(0.5)


def wait_until_the_head_accepts_jobs(address: str, timeout_s: float = 180) -> None:
    """The job agent registers a little after the head starts; until it has, submissions answer
    "No available agent"."""
    from urllib.request import urlopen

    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout_s
    urlopen(f"{address}/api/version", timeout=30).read()
    client = JobSubmissionClient(address)
    while True:
        try:
            client.submit_job(entrypoint="true")
            return
        except RuntimeError as error:
            assert "No available agent" in str(error) and time.time() < deadline, error
            time.sleep(2)


def wait_for_nodes(count: int, timeout_s: float = 120) -> None:
    """Until this driver's cluster has `count` live nodes."""
    import ray

    deadline = time.time() + timeout_s
    while sum(node["Alive"] for node in ray.nodes()) != count:
        assert time.time() < deadline, f"{count} live nodes expected: {ray.nodes()}"
        time.sleep(0.5)
