"""One rule for devices: each pool's device comes from its resources in the config, never from what torch can see
(a CPU actor on a GPU node sees every GPU under Ray 2.60). Checked on this GPU-less machine by making torch claim a
GPU: a CPU pool must not reach for it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from ebft.actor_resources import NOSET_CUDA_VISIBLE_DEVICES, actor_device, actor_options
from ebft.config import PoolResources, build_config

PACKAGE = Path(__file__).resolve().parent.parent / "ebft"


@pytest.fixture
def torch_sees_a_gpu(monkeypatch):
    """torch reports a GPU, and any use of CUDA fails loudly (as it would land on GPU 0 next to a vLLM engine)."""

    def touched(*args, **kwargs):
        raise AssertionError("a CPU pool touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("get_rng_state_all", "get_rng_state", "set_rng_state_all", "set_rng_state", "set_device", "init"):
        monkeypatch.setattr(torch.cuda, name, touched)


def test_no_pool_imports_the_loop_that_drives_it():
    arrows = []
    for pool in ("actors", "features", "learner"):
        for path in sorted((PACKAGE / pool).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                arrows += [f"{path.relative_to(PACKAGE)} -> {m}" for m in modules if m.startswith("ebft.cluster")]
    assert not arrows


def test_cpu_actors_start_with_no_visible_gpu_and_gpu_actors_keep_theirs():
    cpu = actor_options(PoolResources(cpus_per_actor=2))["runtime_env"]["env_vars"]
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "2"
    gpu = actor_options(PoolResources(gpus_per_actor=1))["runtime_env"]["env_vars"]
    assert "CUDA_VISIBLE_DEVICES" not in gpu  # Ray sets it to the actor's own GPUs
    merged = actor_options(PoolResources(), runtime_env={"env_vars": {"X": "1"}})["runtime_env"]["env_vars"]
    assert merged["X"] == "1" and merged["CUDA_VISIBLE_DEVICES"] == ""


def test_a_cpu_ray_actor_starts_with_no_visible_gpu(local_ray):
    """Ray 2.60 leaves a GPU node's CUDA_VISIBLE_DEVICES to actors that asked for no GPU: the actor's own empty
    setting must reach its process."""
    import ray

    class Probe:
        def visible(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES")

    options = actor_options(PoolResources(cpus_per_actor=0.5))
    probe = ray.remote(Probe).options(**options).remote()
    try:
        assert ray.get(probe.visible.remote()) == ""
    finally:
        ray.kill(probe)


def test_pool_devices_follow_the_config_not_torch(torch_sees_a_gpu, monkeypatch):
    assert actor_device(PoolResources()) == torch.device("cpu")
    assert actor_device(PoolResources(gpus_per_actor=1)) == torch.device("cuda", 0)


@pytest.mark.parametrize("assigned, visible", [([3], "3"), (["5", "2", "10"], "2,5,10")])
def test_under_noset_a_gpu_actor_sees_only_its_own_gpus_in_order(monkeypatch, assigned, visible):
    """A cluster that leaves CUDA_VISIBLE_DEVICES alone shows every actor every GPU (stand-in ids here): an actor on
    GPUs narrows it to the ones Ray assigned, so its cuda:0 and its vLLM workers' cuda:{local_rank} are its own."""
    import ray

    from ebft.actor_resources import show_only_assigned_gpus

    monkeypatch.setenv(NOSET_CUDA_VISIBLE_DEVICES, "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7,8,9,10")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: assigned)
    show_only_assigned_gpus(PoolResources())  # a CPU actor keeps what it was given
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7,8,9,10"
    show_only_assigned_gpus(PoolResources(gpus_per_actor=len(assigned)))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible
    assert actor_device(PoolResources(gpus_per_actor=len(assigned))) == torch.device("cuda", 0)


def test_a_cpu_feature_worker_computes_on_the_cpu_when_torch_sees_a_gpu(tiny_model_dir, torch_sees_a_gpu):
    from ebft.features.extractor import FeatureExtractor

    config = build_config({"data": {"chunk_length": 32}, "model": {"dtype": "float32"}})
    extractor = FeatureExtractor(tiny_model_dir, config)
    assert extractor.device == torch.device("cpu")
    assert {p.device.type for p in extractor.model.parameters()} == {"cpu"}


def test_a_cpu_learner_checkpoints_no_cuda_rng_when_torch_sees_a_gpu(tmp_path, torch_sees_a_gpu):
    from ebft.learner.checkpoint import capture_rng_state, load_rng_state

    state = capture_rng_state(torch.device("cpu"))
    assert "cuda" not in state
    torch.save(state, tmp_path / "rng.pt")
    load_rng_state(tmp_path / "rng.pt", torch.device("cpu"))


def test_tensor_parallel_rollout_engines_get_their_size_and_the_gpu_transfer_backend(monkeypatch, tiny_model_dir):
    import vllm

    from ebft.actors import rollout
    from ebft.actors.rollout import RolloutWorker

    built, waited = {}, []
    monkeypatch.setattr(vllm, "LLM", lambda path, **options: built.update(options, path=path))
    monkeypatch.setattr(rollout, "wait_for_free_gpu_memory", lambda fraction, timeout_s: waited.append(fraction))
    gpus = {"rollout": {"gpus_per_actor": 2}, "features": {"gpus_per_actor": 1}, "learner": {"gpus_per_actor": 1}}
    config = build_config({"model": {"policy": str(tiny_model_dir)}, "resources": gpus})
    worker = RolloutWorker.__new__(RolloutWorker)
    worker.config, worker.model_path = config, str(tiny_model_dir)
    worker._build_engine(enforce_eager=False)
    assert built["tensor_parallel_size"] == 2 and built["distributed_executor_backend"] == "mp"
    assert built["weight_transfer_config"].backend == "ebft_nccl"
    assert built["gpu_memory_utilization"] == config.rollout.gpu_memory_utilization
    assert waited == [config.rollout.gpu_memory_utilization]  # a predecessor's memory is waited for first
    assert "kv_cache_memory_bytes" not in built


def test_pools_that_need_more_gpus_than_the_cluster_has_are_a_config_error(monkeypatch):
    import ray

    from ebft.cluster.placement import check_fits
    from ebft.config import ConfigError

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    gpus = {pool: {"gpus_per_actor": 1} for pool in ("rollout", "features", "learner")}
    with pytest.raises(ConfigError, match="the pools need 3 GPU but the Ray cluster has 1"):
        check_fits(build_config({"resources": gpus}))
    check_fits(build_config({"resources": {"rollout": {"gpus_per_actor": 1}}}))


def test_a_replacement_engine_waits_until_its_predecessor_freed_the_gpu(caplog):
    """The old EngineCore frees its GPU memory only when Ray reaps it (stand-in readings of (free, total) bytes)."""
    from ebft.actors.engine_process import wait_for_free_gpu_memory

    readings = iter([(10, 100), (40, 100), (85, 100), (85, 100)])
    calls = []

    def memory():
        calls.append(1)
        return next(readings)

    wait_for_free_gpu_memory(0.8, timeout_s=30, memory=memory, poll_s=0.001)
    assert len(calls) == 3  # returned at the first reading with 80% free
    wait_for_free_gpu_memory(0.8, timeout_s=0.05, memory=lambda: (50, 100), poll_s=0.001)
    assert "only 0.0 of 0.0 GiB of the GPU are free" in caplog.text
