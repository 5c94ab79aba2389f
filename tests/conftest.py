"""Shared fixtures: environment for real engines on a small CPU machine, and tiny random models."""

from __future__ import annotations

import contextlib
import os
import signal

# Set before vLLM / Ray / DeepSpeed are imported anywhere in the test process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Token auth off for every Ray session of this process, as for the loopback nodes (tests/ray_cluster.py): a local
# `ray.init()` with RAY_AUTH_MODE unset sets it to "token" in os.environ for the rest of the process, and a driver
# in token mode rejects the token-less calls of a loopback head's GCS, which then cancels the driver's actors
# before they start ("all references to the actor were removed").
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import make_tiny_llama, smollm2_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny ops: a second OpenMP thread only adds synchronisation (3-4x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray runtime with the job environment `ebft train` uses, for one test module."""
    import ray

    from ebft.cluster.train import JOB_ENV

    ray.init(
        address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": JOB_ENV}, log_to_driver=False
    )
    yield
    groups = actor_process_groups()
    ray.shutdown()
    end_process_groups(groups)


def actor_process_groups() -> set[int]:
    """The process groups of this test process's Ray workers (each actor and its engine's processes share one)."""
    import psutil

    groups = set()
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            command = " ".join(process.cmdline())
            if command.startswith("ray::") or command.startswith("VLLM::"):
                groups.add(os.getpgid(process.pid))
    groups.discard(os.getpgid(0))
    return groups


def end_process_groups(groups: set[int]) -> None:
    """An actor killed just before `ray.shutdown` leaves its EngineCore to init (the raylet that would clean up its
    group is gone): such an orphan would hold memory and CPU through every later test."""
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def tiny_model_with_tokenizer(tmp_path_factory):
    """A random tiny Llama over SmolLM2's real tokenizer, so real text data can be packed for it."""
    directory = tmp_path_factory.mktemp("tiny-llama-tokenizer")
    tokenizer = smollm2_tokenizer()
    special_tokens = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    make_tiny_llama(directory, seed=2, vocab_size=len(tokenizer), special_tokens=special_tokens)
    tokenizer.save_pretrained(directory)
    return directory
