"""`ebft submit`: run `ebft train` on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import os
import shlex
import sys
import uuid
from pathlib import Path

from ebft.config import ConfigError, dump_config, load_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never shipped to the cluster: environments, run outputs, caches.
JOBS_DIR = ".ebft-jobs"
EXCLUDES = [".venv", ".git", "runs", "wandb", "**/__pycache__", ".pytest_cache", "*.egg-info", "build"]
IGNORE_GITIGNORE = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"
# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default: 3). `ebft train`
# answers SIGTERM by finishing the step in progress and saving a checkpoint, which needs longer.
STOP_GRACE_S = 600


def job_entrypoint(config_in_project: str, resume: bool, python: str, command: str = "train") -> str:
    words = [python, "-m", "ebft.cli", command, config_in_project] + (["--resume"] if resume else [])
    return " ".join(shlex.quote(w) for w in words)


def submit(
    config_path: str,
    overrides: list[str],
    *,
    address: str,
    resume: bool = False,
    python: str | None = None,
    project_root: Path = PROJECT_ROOT,
    command: str = "train",
) -> str:
    """Submit `ebft train` (or `ebft compare`) as a job; returns its id. The config is validated here,
    before anything is sent."""
    from ray.job_submission import JobSubmissionClient

    if command == "compare" and resume:
        raise ConfigError("ebft compare resumes by itself (it reuses finished arms); submit it without --resume")
    config = load_config(config_path, overrides)
    # The job trains exactly the configuration validated here: frozen into the shipped directory.
    frozen = project_root / JOBS_DIR / f"{uuid.uuid4().hex[:12]}.yaml"
    frozen.parent.mkdir(exist_ok=True)
    frozen.write_text(dump_config(config))
    client = JobSubmissionClient(address)
    # On homogeneous nodes the submitting interpreter's path is valid on the head; a bare `python`
    # would be whatever the node's PATH finds first.
    entrypoint = job_entrypoint(str(frozen.relative_to(project_root)), resume, python or sys.executable, command)
    # Ray leaves out what .gitignore names, the frozen config included; EXCLUDES lists what must stay out.
    previous = os.environ.get(IGNORE_GITIGNORE)
    os.environ[IGNORE_GITIGNORE] = "1"
    try:
        return client.submit_job(
            entrypoint=entrypoint,
            runtime_env={
                "working_dir": str(project_root),
                "excludes": EXCLUDES,
                "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S)},
            },
            metadata={"ebft_config": str(config_path)},
        )
    finally:
        if previous is None:
            os.environ.pop(IGNORE_GITIGNORE)
        else:
            os.environ[IGNORE_GITIGNORE] = previous


def main_submit(
    config_path: str, overrides: list[str], *, address: str, resume: bool = False, command: str = "train"
) -> int:
    job_id = submit(config_path, overrides, address=address, resume=resume, command=command)
    print(f"submitted job {job_id}")
    print(f"follow its logs:  ray job logs --address {address} --follow {job_id}")
    print(f"its status:       ray job status --address {address} {job_id}")
    print(f"stop it:          ray job stop --address {address} {job_id}   (finishes the step, checkpoints)")
    return 0
