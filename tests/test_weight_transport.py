"""Weight transport: weight-update messages, which transport a config gets (and which it is refused), the engine
calls of a broadcast receiver, and a real object-store update of SmolLM2 (tied embeddings) checked against
transformers. The broadcast protocol itself runs in tests/test_weight_protocol.py."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from helpers import transformers_greedy, weights_of

from ebft.actors.weight_receiver import _quiet_expected_reload_warnings, receive_weight_broadcast
from ebft.config import NCCL, OBJECT_STORE, ConfigError, build_config
from ebft.learner.weight_sender import state_dict_to_update


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


def test_auto_transport_is_nccl_only_when_both_pools_have_whole_gpus():
    assert build_config({}).weight_transport == OBJECT_STORE
    gpus = {"resources": {"rollout": {"gpus_per_actor": 1}, "learner": {"gpus_per_actor": 1}}}
    assert build_config(gpus).weight_transport == NCCL
    assert build_config({"resources": {"rollout": {"gpus_per_actor": 1}}}).weight_transport == OBJECT_STORE
    assert build_config({**gpus, "rollout": {"weight_transport": "object_store"}}).weight_transport == OBJECT_STORE
    tensor_parallel = {"resources": {"rollout": {"gpus_per_actor": 2}, "learner": {"gpus_per_actor": 1}}}
    assert build_config(tensor_parallel).weight_transport == NCCL
    # A workstation: every pool on a share of its one GPU; NCCL refuses two ranks on one device.
    shared = {pool: {"gpus_per_actor": 0.3} for pool in ("rollout", "features", "learner")}
    workstation = build_config({"resources": shared, "rollout": {"gpu_memory_utilization": 0.24}})
    assert workstation.weight_transport == OBJECT_STORE


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["rollout.weight_transport=nccl"], "rollout.weight_transport=auto"),
        (
            [*[f"resources.{p}.gpus_per_actor=0.5" for p in ("rollout", "learner")], "rollout.weight_transport=nccl"],
            "NCCL refuses two ranks",
        ),
        (["resources.learner.gpus_per_actor=2"], "resources.learner.gpus_per_actor=2: a learner actor computes on one"),
        (["resources.features.gpus_per_actor=2"], "raise resources.features.num_actors"),
        (["resources.rollout.gpus_per_actor=1.5"], "set it to 1 or 2"),
        (["resources.rollout.gpus_per_actor=0.5"], "set rollout.gpu_memory_utilization below 0.5"),
        (["resources.rollout.gpus_per_actor=1", "rollout.weight_transport=gloo"], "gloo is for CPU pools"),
        (["rollout.batch_invariant=true"], "set rollout.batch_invariant=false"),
    ],
)
def test_configs_that_cannot_work_on_gpus_are_refused_saying_what_to_set(overrides, says):
    if "NCCL refuses" in says:
        overrides = [*overrides, "rollout.gpu_memory_utilization=0.4"]
    with pytest.raises(ConfigError, match=re.escape(says)):
        build_config(overrides=overrides)


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


# ----------------------------------------------------------------------------- the packed wire format


class LoopbackGroup:
    """Rank 0's broadcasts recorded, then replayed into a receiver's buffers (one process, no network)."""

    def __init__(self):
        self.sent, self.replaying = [], False

    def start_broadcast(self, tensor):
        if self.replaying:
            tensor.copy_(self.sent.pop(0))
        else:
            self.sent.append(tensor.clone())
        return lambda: True


def test_packed_buffers_are_cut_as_vllm_cuts_them_and_unpack_to_the_same_tensors():
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    from ebft.weight_broadcast import packed_batches, receive_packed, send_packed

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (300,), (2, 3, 4), (64, 16), (1,), (), (33, 9)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.float32, torch.bfloat16]
    weights = [(f"w{i}", torch.randn(s, generator=generator).to(d)) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    weights[2] = ("w2", torch.randn(4, 3, 2, generator=generator).half().permute(2, 1, 0))  # not contiguous
    for buffer_bytes in (1, 100, 1000, 1 << 20):
        ours = [[name for name, _ in batch] for batch in packed_batches(weights, buffer_bytes)]
        iterator, theirs = iter(weights), []
        while (chunk := pack_tensors(iterator, lambda item: item[1], buffer_bytes)) is not None:
            theirs.append(chunk.names)
        assert ours == theirs, buffer_bytes

        group = LoopbackGroup()
        waited = []
        send_packed(iter(weights), group, buffer_bytes, lambda done: waited.append(done()))
        assert waited == [True] * len(theirs)  # every buffer waited for before the next is packed
        assert len(group.sent) == len(theirs)
        group.replaying, received = True, []
        metadata = [(name, list(t.shape), t.dtype) for name, t in weights]
        receive_packed(metadata, group, buffer_bytes, torch.device("cpu"), lambda views: received.extend(views))
        assert [name for name, _ in received] == [name for name, _ in weights]
        for (_, got), (_, sent) in zip(received, weights):
            assert got.dtype == sent.dtype and torch.equal(got, sent)


def test_rollout_actors_run_the_engine_as_their_transport_and_seeding_need():
    from ebft.actors.pool import rollout_actor_env

    assert rollout_actor_env(build_config({}))["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # CPU: in-process engine
    gloo = rollout_actor_env(build_config({"rollout": {"weight_transport": "gloo"}}))
    assert gloo["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # the GPU protocol as GPU engines run it
    gpus = {pool: {"gpus_per_actor": 1} for pool in ("rollout", "features", "learner")}
    invariant = rollout_actor_env(build_config({"resources": gpus, "rollout": {"batch_invariant": True}}))
    assert invariant["VLLM_BATCH_INVARIANT"] == "1" and invariant.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0"
    assert "VLLM_BATCH_INVARIANT" not in rollout_actor_env(build_config({"resources": gpus}))
