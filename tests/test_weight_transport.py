"""Weight transport: weight-update messages, the NCCL transport's bookkeeping (with a fake group; it
needs GPUs), and a real object-store update of SmolLM2 (tied embeddings) checked against transformers."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import transformers_greedy, weights_of

from ebft.actors.weight_receiver import _quiet_expected_reload_warnings, receive_weight_broadcast
from ebft.config import NCCL, OBJECT_STORE, build_config
from ebft.learner.nccl_sender import NcclWeightSender
from ebft.learner.weight_sender import WeightPush, state_dict_to_update


def test_state_dict_round_trip_keeps_names_dtypes_and_values():
    weights = {
        "a.weight": torch.randn(4, 3, dtype=torch.bfloat16),
        "b.weight": torch.randn(3, 5).t(),  # not contiguous
        "c.bias": torch.arange(6, dtype=torch.int64),
    }
    update = state_dict_to_update(weights, version=7)
    assert update.version == 7 and all(raw.dtype == np.uint8 for raw in update.raw.values())
    loaded = weights_of(update)
    assert sorted(loaded) == sorted(weights)
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_tied_embeddings_travel_once_under_the_embedding_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    )
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    loaded = weights_of(state_dict_to_update(state, 1))
    assert "lm_head.weight" not in loaded
    assert set(loaded) == set(state) - {"lm_head.weight"}
    assert torch.equal(loaded["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_auto_transport_is_nccl_only_when_both_pools_have_gpus():
    assert build_config({}).weight_transport == OBJECT_STORE
    gpus = {"resources": {"rollout": {"gpus_per_actor": 1}, "learner": {"gpus_per_actor": 1}}}
    assert build_config(gpus).weight_transport == NCCL
    assert build_config({"resources": {"rollout": {"gpus_per_actor": 1}}}).weight_transport == OBJECT_STORE
    assert build_config({**gpus, "rollout": {"weight_transport": "object_store"}}).weight_transport == OBJECT_STORE


# ----------------------------------------------------------------------------- NCCL bookkeeping (fake group)


class FakeGroup:
    """Stands in for vLLM's PyNcclCommunicator: rank 0's broadcast hands each tensor to every receiver.

    Like NCCL, a broadcast with a receiver that is not waiting inside its receive call would hang;
    here it fails instead.
    """

    def __init__(self, receivers):
        self.receivers = receivers
        self.broadcasts = 0

    def broadcast(self, tensor, src, stream=None):
        assert src == 0
        # NCCL blocks until every rank has joined; a receiver that never does hangs it (fails here).
        assert all(r.receiving.wait(timeout=5) for r in self.receivers), "broadcast without every receiver waiting"
        self.broadcasts += 1
        for receiver in self.receivers:
            receiver.inbox.append(tensor.clone())
            receiver.arrived.release()


class FakeReceiver:
    """A rollout actor's NCCL side, with Ray's `.method.remote(...)` calling convention (futures on threads)."""

    pool = ThreadPoolExecutor(max_workers=8)

    def __init__(self, world_size: int, version_offset: int = 0):
        self.size, self.version_offset = world_size, version_offset
        self.init_info, self.inbox, self.received = None, [], []
        self.receiving, self.arrived = threading.Event(), threading.Semaphore(0)
        self.version = 0
        for name in ("weight_transfer_world_size", "init_weight_transfer", "receive_weight_broadcast"):
            method = getattr(self, "_" + name)
            setattr(
                self, name, type("Remote", (), {"remote": staticmethod(lambda *a, m=method: self.pool.submit(m, *a))})
            )

    def _weight_transfer_world_size(self):
        return self.size

    def _init_weight_transfer(self, info):
        self.init_info = info

    def _receive_weight_broadcast(self, info, version):
        self.receiving.set()
        tensors = []
        for name, dtype, shape in zip(info["names"], info["dtype_names"], info["shapes"]):
            assert self.arrived.acquire(timeout=10), "no broadcast arrived"
            tensor = self.inbox.pop(0)
            assert str(tensor.dtype) == f"torch.{dtype}" and list(tensor.shape) == shape
            tensors.append((name, tensor))
        self.receiving.clear()
        self.received.append((version, tensors))
        self.version = version + self.version_offset
        return self.version


def wait_all(futures):
    return [future.result(timeout=30) for future in futures]


def push(sender, weights, version):
    """What the learner group does with a push: send, then confirm every receiver applied it."""
    return WeightPush(version, sender.send(weights, version), wait=wait_all).confirm()


def make_sender(receivers):
    groups = []

    def open_group(address, port, world_size):
        groups.append((address, port, world_size))
        return FakeGroup(receivers)

    sender = NcclWeightSender(
        receivers, master_address="10.0.0.1", master_port=29555, packed=False, wait=wait_all, open_group=open_group
    )
    return sender, groups


def test_nccl_sender_gives_each_engine_its_own_ranks_and_delivers_every_tensor_in_order():
    receivers = [FakeReceiver(world_size=1), FakeReceiver(world_size=2), FakeReceiver(world_size=1)]
    sender, groups = make_sender(receivers)
    with pytest.raises(RuntimeError, match="connect"):
        sender.send({"w": torch.ones(2)}, version=1)
    sender.connect()

    assert groups == [("10.0.0.1", 29555, 5)]
    assert [r.init_info["rank_offset"] for r in receivers] == [1, 2, 4]
    assert {r.init_info["world_size"] for r in receivers} == {5}
    assert all(r.init_info["master_address"] == "10.0.0.1" and r.init_info["packed"] is False for r in receivers)

    weights = {"embed.weight": torch.randn(8, 4, dtype=torch.bfloat16), "norm.weight": torch.rand(4)}
    assert push(sender, weights, version=1) == 1
    assert push(sender, [(name, t * 2) for name, t in weights.items()], version=3) == 3
    assert sender.group.broadcasts == 4
    for receiver in receivers:
        assert [version for version, _ in receiver.received] == [1, 3]
        for (_, tensors), scale in zip(receiver.received, (1, 2)):
            assert [name for name, _ in tensors] == list(weights)
            assert all(torch.equal(t, weights[name] * scale) for name, t in tensors)
        assert receiver.version == 3


def test_nccl_sender_refuses_versions_that_go_back_and_a_push_that_engines_disagree_on():
    receivers = [FakeReceiver(world_size=1)]
    sender, _ = make_sender(receivers)
    sender.connect()
    push(sender, {"w": torch.ones(3)}, version=2)
    assert push(sender, {"w": torch.ones(3)}, version=2) == 2  # the same version again (a restarted pool)
    with pytest.raises(ValueError, match="goes back"):
        sender.send({"w": torch.ones(3)}, version=1)

    lagging = [FakeReceiver(world_size=1), FakeReceiver(world_size=1, version_offset=-1)]
    sender, _ = make_sender(lagging)
    sender.connect()
    with pytest.raises(RuntimeError, match="report versions"):
        push(sender, {"w": torch.ones(3)}, version=1)


class RecordingLLM:
    """Records the engine calls of the receiving side (vLLM's RL API on `LLM`)."""

    def __init__(self, fail_update: bool = False, refuse_cache_reset: bool = False):
        self.calls, self.fail_update, self.refuse_cache_reset = [], fail_update, refuse_cache_reset

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "update_weights" and self.fail_update:
                raise RuntimeError("NCCL error")
            if name == "reset_prefix_cache":
                return not self.refuse_cache_reset

        return record


def test_broadcast_receiver_pauses_updates_finishes_with_the_version_then_resumes():
    llm = RecordingLLM()
    info = {"names": ["w"], "dtype_names": ["float32"], "shapes": [[3]]}
    receive_weight_broadcast(llm, info, version=5)
    assert llm.calls == [
        ("sleep", (), {"level": 0, "mode": "keep"}),
        ("start_weight_update", (), {}),
        ("update_weights", ({"update_info": info},), {}),
        ("finish_weight_update", (), {"weight_version": "5"}),
        ("reset_prefix_cache", (), {}),
        ("wake_up", (), {"tags": ["scheduling"]}),
    ]
    failing = RecordingLLM(fail_update=True)
    with pytest.raises(RuntimeError, match="NCCL"):
        receive_weight_broadcast(failing, info, version=6)
    assert failing.calls[-1][0] == "wake_up"
    assert "finish_weight_update" not in [name for name, _, _ in failing.calls]
    # A prefix cache that cannot be cleared would serve KV of the old weights: fail loudly.
    stale = RecordingLLM(refuse_cache_reset=True)
    with pytest.raises(RuntimeError, match="prefix cache"):
        receive_weight_broadcast(stale, info, version=7)
    assert stale.calls[-1][0] == "wake_up"


# ----------------------------------------------------------------------------- a real model with tied embeddings


@pytest.mark.slow
def test_smollm2_update_with_tied_embeddings_makes_greedy_follow_the_new_weights():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ebft.actors.rollout import RolloutWorker
    from ebft.model_sources import smollm2_path

    path = str(smollm2_path())
    config = build_config(
        {"model": {"policy": path, "dtype": "float32"}, "data": {"chunk_length": 64}, "rollout": {"kv_cache_gib": 0.25}}
    )
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    worker = RolloutWorker(config, path, enforce_eager=True)
    try:
        assert "Paris" in worker.complete(["The capital of France is"], max_tokens=8)[0][0]

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert model.config.tie_word_embeddings
        torch.manual_seed(0)
        with torch.no_grad():
            embedding = model.get_input_embeddings().weight  # also the LM head
            embedding.add_(0.5 * embedding.std() * torch.randn_like(embedding))
            for layer in model.model.layers[::3]:
                layer.mlp.down_proj.weight.mul_(1.5)
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompts = [tokenizer("def fibonacci(n):")["input_ids"], tokenizer("The capital of France is")["input_ids"]]
        before = worker.complete(prompts, max_tokens=10)

        assert worker.update_weights(state_dict_to_update(model.state_dict(), version=1)) == 1
        assert worker.weight_version() == 1
        after = worker.complete(prompts, max_tokens=10)
        assert after == [[transformers_greedy(model, p, 10)] for p in prompts]
        assert after != before
    finally:
        worker.shutdown()
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def test_only_the_expected_reload_warnings_are_silenced():
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    reload_log.addHandler(handler)
    try:
        with _quiet_expected_reload_warnings(tied=True):
            for layer in ("RotaryEmbedding", "ParallelLMHead", "QKVParallelLinear"):
                reload_log.warning("%s: Failed to load weights", layer)
        with _quiet_expected_reload_warnings(tied=False):  # an untied head must load: keep the warning
            reload_log.warning("%s: Failed to load weights", "ParallelLMHead")
        reload_log.warning("%s: Failed to load weights", "RotaryEmbedding")  # outside a reload
    finally:
        reload_log.removeHandler(handler)
    assert shown == [
        "QKVParallelLinear: Failed to load weights",
        "ParallelLMHead: Failed to load weights",
        "RotaryEmbedding: Failed to load weights",
    ]
