"""vLLM's weight-transfer protocol as GPU engines run it, exercised on CPU: the gloo backend registered in vLLM's own
engine factory, engines in vLLM's V1 multiprocessing (an EngineCore process per engine), the packed wire format,
and pushes that fail without hanging (ebft/weight_broadcast.py, ebft/learner/broadcast_sender.py,
ebft/actors/transfer_engines.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
import ray
import safetensors.torch
import torch
from helpers import kill_actor_processes, make_tiny_llama, tiny_run_config, transformers_greedy

from ebft.actors.pool import create_rollout_actor
from ebft.config import build_config
from ebft.learner.deepspeed_setup import free_port

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 42, 7], [100, 3, 250, 9, 11]]


def gloo_config(model_dir, **rollout):
    return build_config(
        {
            "model": {"policy": str(model_dir), "dtype": "float32"},
            "data": {"chunk_length": 32},
            "sampling": {"context_length": 4, "stride": 4, "block_length": 4},
            "resources": {pool: {"cpus_per_actor": 0.5, "threads": 1} for pool in ("rollout", "features", "learner")},
            "rollout": {"kv_cache_gib": 0.125, "weight_transport": "gloo", "weight_buffer_mib": 0.2, **rollout},
            "learner": {"zero_stage": 3, "gradient_checkpointing": False},
            "training": {"docs_per_step": 1},
        }
    )


def greedy(actor, max_tokens=8):
    return ray.get(actor.complete.remote(PROMPTS, max_tokens=max_tokens))


def reference_greedy(model_dir, max_tokens=8):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [[transformers_greedy(model, p, max_tokens)] for p in PROMPTS]


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory):
    """Two tiny tied-embedding Llamas of one shape: the engines start from the first, the learner holds the second."""
    root = tmp_path_factory.mktemp("protocol")
    return make_tiny_llama(root / "a", tie_word_embeddings=True, seed=3), make_tiny_llama(
        root / "b", tie_word_embeddings=True, seed=4
    )


def test_a_gloo_push_into_multiprocess_engines_makes_greedy_follow_the_learner(local_ray, tied_models):
    from ebft.learner.group import LearnerGroup

    engine_model, learner_model = tied_models
    config = gloo_config(engine_model)
    actors = [create_rollout_actor(config, str(engine_model), max_model_len=64) for _ in range(2)]
    learner = LearnerGroup(config, learner_model)
    try:
        assert greedy(actors[0]) == reference_greedy(engine_model)
        learner.connect_weight_receivers(actors)
        assert learner.push_weights().confirm() == 0
        expected = reference_greedy(learner_model)
        assert expected != reference_greedy(engine_model)
        assert [greedy(actor) for actor in actors] == [expected, expected]
        # Reconnecting (a replaced pool member, a restarted learner) shuts the previous group down first.
        connections = open_connections(actors[0])
        for _ in range(3):
            learner.connect_weight_receivers(actors)
            assert learner.push_weights().confirm() == 0
        assert open_connections(actors[0]) == connections
    finally:
        learner.shutdown()
        for actor in actors:
            ray.kill(actor)


def test_an_object_store_push_into_a_multiprocess_engine_makes_greedy_follow_the_learner(
    local_ray, tied_models, monkeypatch
):
    """Pools that share a GPU push through the object store into engines in their own process (vLLM's default on
    GPUs), where collective_rpc's arguments cross as msgpack: the weights must arrive whole."""
    from ebft.actors import pool
    from ebft.learner.group import LearnerGroup

    monkeypatch.setitem(pool.CPU_ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine_model, learner_model = tied_models
    config = gloo_config(engine_model, weight_transport="object_store")
    actor = pool.create_rollout_actor(config, str(engine_model), max_model_len=64)
    learner = LearnerGroup(config, learner_model)
    try:
        assert engine_processes(actor)  # an EngineCore process of its own
        learner.connect_weight_receivers([actor])
        assert learner.push_weights().confirm() == 0
        expected = reference_greedy(learner_model)
        assert expected != reference_greedy(engine_model)
        assert greedy(actor) == expected
    finally:
        learner.shutdown()
        ray.kill(actor)


def open_connections(actor) -> int:
    """TCP connections held by the processes of a rollout actor's engine (a leaked transfer group keeps its own)."""
    return sum(len(process.net_connections(kind="tcp")) for process in engine_processes(actor))


def actor_pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))


def engine_processes(actor) -> list:
    import psutil

    return psutil.Process(actor_pid(actor)).children(recursive=True)


def sender_for(actors, config, **options):
    from ebft.learner.weight_sender import make_weight_sender

    options = {"master_address": "127.0.0.1", "master_port": free_port(), "device": torch.device("cpu"), **options}
    sender = make_weight_sender(config, actors, **options)
    sender.connect()
    return sender


def model_weights(model_dir):
    from transformers import AutoModelForCausalLM

    from ebft.learner.state_dict import iter_state_dict

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return dict(iter_state_dict(model, zero3=False, rank=0, device="cpu"))


def ended_within(pid: int, seconds: float) -> bool:
    """Whether the process ended within `seconds` (gone, or a zombie its parent has not reaped). The process, not
    Ray's report of the actor's death: that comes later on a loaded machine, and is Ray's to make."""
    import psutil

    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    deadline = time.monotonic() + seconds
    while running(process):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def running(process) -> bool:
    """Neither gone nor a zombie its parent has not reaped yet."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_receiver_killed_during_a_push_fails_it_at_once_and_every_receiver_is_replaced(local_ray, tied_models):
    """With NCCL's semantics the other receivers' broadcasts never complete: the sender notices the dead one from its
    acknowledgment, declares the round failed, and the others end themselves, named in the same failure."""
    import os
    import signal
    import time

    from ebft.actor_failures import RolloutActorsFailed
    from ebft.learner.weight_sender import WeightPush, WeightStream

    engine_model, learner_model = tied_models
    config = gloo_config(engine_model, weight_sync_timeout_s=60)
    actors = [create_rollout_actor(config, str(engine_model), max_model_len=64) for _ in range(2)]
    replacements = []
    try:
        assert all(engine_processes(actor) for actor in actors), "the engines run in-process, not as GPU engines do"
        survivor, victim = actor_pid(actors[0]), actor_pid(actors[1])
        sender = sender_for(actors, config)
        weights = model_weights(learner_model)

        def killing_stream():
            for index, item in enumerate(weights.items()):
                if index == 3:  # the first buffers are out: the receivers are inside update_weights
                    os.kill(victim, signal.SIGKILL)
                    time.sleep(1.0)
                yield item

        metadata = [(name, list(t.shape), t.dtype) for name, t in weights.items()]
        started = time.monotonic()
        with pytest.raises(RolloutActorsFailed) as failure:
            sender.send(WeightStream(metadata, killing_stream()), version=1)
        assert time.monotonic() - started < 30, "the push waited for the dead receiver"
        assert sorted(failure.value.actor_ids) == sorted(a._actor_id.hex() for a in actors)
        assert ended_within(survivor, 20), "a receiver of a failed round outlived it"

        replacements = [create_rollout_actor(config, str(engine_model), max_model_len=64) for _ in range(2)]
        sender = sender_for(replacements, config)
        ids = [a._actor_id.hex() for a in replacements]
        assert WeightPush(2, sender.send(weights, 2), ids, 60).confirm() == 2
        expected = reference_greedy(learner_model)
        assert [greedy(actor) for actor in replacements] == [expected, expected]
    finally:
        for actor in [*actors, *replacements]:
            ray.kill(actor)


def test_a_receiver_that_does_not_answer_fails_the_push_within_its_bound(local_ray, tied_models):
    import os
    import signal
    import time

    from ebft.actor_failures import RolloutActorsFailed

    engine_model, _ = tied_models
    config = gloo_config(engine_model, weight_sync_timeout_s=20)
    actors = [create_rollout_actor(config, str(engine_model), max_model_len=64) for _ in range(2)]
    try:
        frozen, entered = actor_pid(actors[0]), actor_pid(actors[1])  # the engines are up
        sender = sender_for(actors, config)
        os.kill(frozen, signal.SIGSTOP)  # alive but never answering, as a wedged engine would be
        started = time.monotonic()
        with pytest.raises(RolloutActorsFailed) as failure:
            sender.send(model_weights(engine_model), version=1)
        assert 20 <= time.monotonic() - started < 20 + 15, "one deadline for the whole push"
        assert sorted(failure.value.actor_ids) == sorted(a._actor_id.hex() for a in actors)  # all at once
        assert ended_within(entered, 20), "the receiver that entered the failed round outlived it"
        os.kill(frozen, signal.SIGCONT)
        assert ended_within(frozen, 30), "the thawed receiver entered a round declared failed and went on"
    finally:
        for actor in actors:
            ray.kill(actor)


def test_engines_left_inside_the_push_of_a_learner_that_died_end_themselves_at_once(local_ray, tied_models):
    """NCCL engines waiting on a dead sender would wait for good: the guard sees the group's store go with it."""
    import time

    from ebft.learner.weight_sender import WeightStream

    engine_model, _ = tied_models
    config = gloo_config(engine_model, weight_sync_timeout_s=120)
    actors = [create_rollout_actor(config, str(engine_model), max_model_len=64) for _ in range(2)]

    class SlowLearner:  # a learner's rank 0 whose push stalls after its first buffers
        def __init__(self):
            self.inside = False

        def push(self, actors, config, weights, port):
            from ebft.learner.weight_sender import make_weight_sender

            sender = make_weight_sender(
                config, actors, master_address="127.0.0.1", master_port=port, device=torch.device("cpu")
            )
            sender.connect()

            def stalling():
                for index, item in enumerate(weights.items()):
                    if index == 3:  # every receiver entered the round (the stream is read only after that)
                        self.inside = True
                        time.sleep(600)
                    yield item

            metadata = [(name, list(t.shape), t.dtype) for name, t in weights.items()]
            sender.send(WeightStream(metadata, stalling()), version=1)

        def stalled(self) -> bool:
            return self.inside

    dying = ray.remote(num_cpus=0, max_concurrency=2)(SlowLearner).remote()
    try:
        pids = [actor_pid(actor) for actor in actors]  # the engines are up
        dying.push.remote(actors, config, model_weights(engine_model), free_port())
        deadline = time.monotonic() + 120
        while not ray.get(dying.stalled.remote()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.get(dying.stalled.remote()), "the push never got inside the round"
        assert not ended_within(pids[0], 0.5)
        ray.kill(dying)
        started = time.monotonic()
        assert all(ended_within(pid, 30) for pid in pids)
        assert time.monotonic() - started < 30, "the engines waited for their bound (120 s), not for the store"
    finally:
        for actor in actors:
            ray.kill(actor)


# ----------------------------------------------------------------------------- whole runs over the gloo protocol


def gloo_run_config(model_dir, output_dir, timeout_s: float = 60):
    return build_config(
        tiny_run_config(
            model_dir,
            output_dir,
            rollout={"weight_transport": "gloo", "weight_sync_timeout_s": timeout_s},
            training={"steps": 4, "max_staleness": 0},
        )
    )


@pytest.fixture(scope="module")
def straight_gloo_run(local_ray, tiny_model_with_tokenizer, tmp_path_factory):
    """An uninterrupted synchronous gloo run: what a run whose learner was restarted must end at."""
    from ebft.cluster.train import run

    return run(gloo_run_config(tiny_model_with_tokenizer, tmp_path_factory.mktemp("straight-gloo") / "run"))


def freeze(name: str, killed: list) -> None:
    kill_actor_processes(name, 0, None, killed, signal.SIGSTOP)


def kill(name: str, killed: list) -> None:
    kill_actor_processes(name, 0, None, killed, signal.SIGKILL)


def thaw(pids: list) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # killed as it was replaced
            os.kill(pid, signal.SIGCONT)


def frozen_then_killed(killed: list) -> None:
    """The rollout actor frozen as the push starts (the learner's rank 0 waits for it to enter), then killed."""
    frozen = []
    freeze("RolloutWorker", frozen)
    time.sleep(3)
    kill("RolloutWorker", killed)
    thaw(frozen)


def learner_killed_inside_the_push(killed: list) -> None:
    """The rollout actor frozen so the push cannot complete, the learner's rank killed inside it, the actor thawed
    into a round whose sender is gone."""
    frozen = []
    freeze("RolloutWorker", frozen)
    time.sleep(3)
    kill("LearnerRankActor", killed)
    thaw(frozen)


@pytest.mark.parametrize(
    "victim, when",
    [
        ("RolloutWorker", frozen_then_killed),
        ("RolloutWorker", freeze),
        ("VLLM::EngineCore", 1),
        ("LearnerRankActor", learner_killed_inside_the_push),
    ],
    ids=["rollout-actor-in-a-push", "receiver-frozen-in-a-push", "engine-core-alone", "learner-rank-in-a-push"],
)
def test_a_gloo_run_survives_each_fault_and_trains_every_chunk_once(
    local_ray, tiny_model_with_tokenizer, tmp_path, monkeypatch, straight_gloo_run, victim, when
):
    """Over the gloo transport, which fails as NCCL fails (a broadcast with a dead or frozen peer never completes
    nor raises), and with engines in vLLM's V1 multiprocessing as on GPUs: SIGKILL a rollout actor while the
    learner's second push waits on it; freeze one (SIGSTOP) as that push starts; SIGKILL an engine's EngineCore alone
    after a training row, or the learner's rank inside its second push. (A rollout actor killed between pushes is
    test_cluster.py's: the replacement joins the next push's group as after rollout-actor-in-a-push; a learner rank
    killed between pushes, whose restart reconnects engines that still hold its group, is test_lora_run.py's.) The
    run finishes with every scheduled chunk trained exactly once, nothing left running, and the uninterrupted run's
    weights (a replaced rollout actor regenerates what was lost; a restarted learner goes back to the base weights,
    as no checkpoint was saved before the end)."""
    from ebft.cluster.train import run
    from ebft.learner.group import LearnerGroup

    config = gloo_run_config(tiny_model_with_tokenizer, tmp_path / "run", timeout_s=20 if when is freeze else 60)
    killed = []
    if callable(when):  # at the start of the second push
        push, pushes = LearnerGroup.push_weights, []

        def push_and_act(group):
            pushes.append(1)
            if len(pushes) == 2:
                threading.Thread(target=when, args=(killed,) if when is not freeze else (victim, killed)).start()
            return push(group)

        monkeypatch.setattr(LearnerGroup, "push_weights", push_and_act)
        killer = threading.Thread(target=lambda: None)
    else:
        killer = threading.Thread(
            target=kill_actor_processes, args=(victim, when, tmp_path / "run" / "metrics.jsonl", killed)
        )
    killer.start()
    started = time.monotonic()
    summary = run(config)
    killer.join(timeout=5)
    assert killed, f"no {victim} was killed"
    assert summary.restarts >= 1
    assert summary.trained_chunks == summary.scheduled_chunks == 8
    assert sorted(summary.trained_chunk_ids) == list(range(8))
    assert time.monotonic() - started < 600, "a wait took its bound several times over"
    assert not engine_cores_left(), "an EngineCore outlived its rollout actor"
    thaw(killed)
    # What a replaced actor regenerates is what the lost one would have sampled: the same weights at the end.
    survived = safetensors.torch.load_file(str(summary.checkpoint / "model.safetensors"))
    straight = safetensors.torch.load_file(str(straight_gloo_run.checkpoint / "model.safetensors"))
    for name, value in straight.items():
        torch.testing.assert_close(survived[name], value, atol=1e-6, rtol=1e-5, msg=name)


def engine_cores_left(wait_s: float = 15.0) -> list:
    """This test's EngineCore processes still running once the run's actors are gone (give Ray a moment)."""
    import time

    import psutil

    def running_engine_core(process) -> bool:
        try:
            return running(process) and "EngineCore" in " ".join(process.cmdline())
        except psutil.Error:  # gone meanwhile
            return False

    deadline = time.monotonic() + wait_s
    while True:
        left = [p for p in psutil.Process().children(recursive=True) if running_engine_core(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
