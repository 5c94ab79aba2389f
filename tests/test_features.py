"""Feature map and feature workers, checked against separate causal forwards computed here in float64."""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from ebft.config import build_config
from ebft.features.extractor import FeatureExtractor
from ebft.features.pool import create_feature_worker
from ebft.features.pooling import feature_layer_indices, pool_blocks, token_features
from ebft.layout import BlockPlan
from ebft.messages import ChunkBatch, RolloutBatch
from ebft.packed_attention import blocks_per_group

# T=40, C=8, s=4, G=4 -> NB=8 blocks, n=3 samples; the tiny Llama has 4 layers, hidden size 64.
GEOMETRY = [
    "data.chunk_length=40",
    "sampling.context_length=8",
    "sampling.stride=4",
    "sampling.block_length=4",
    "sampling.num_samples=3",
]
TINY_LAYERS = 4


def make_config(*overrides):
    return build_config(overrides=[*GEOMETRY, "model.dtype=float32", *overrides])


def make_batch(num_docs, num_samples=3, seed=0, chunk_ids=None):
    plan = BlockPlan(40, 8, 4, 4)
    generator = torch.Generator().manual_seed(seed)
    docs = torch.randint(3, 500, (num_docs, 40), generator=generator)
    rollouts = torch.randint(3, 500, (num_docs, num_samples, plan.num_blocks, 4), generator=generator)
    chunks = ChunkBatch(chunk_ids=chunk_ids or list(range(num_docs)), tokens=docs, step=0)
    return RolloutBatch(chunks, rollouts, torch.zeros(rollouts.shape), weight_version=0)


def reference_model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float64).eval()
    # transformers returns the FINAL-NORM output as the last hidden state; the features use the residual
    # stream before that norm, so the reference drops it.
    model.model.norm = torch.nn.Identity()
    return model


def reference_feature(hidden_states, layers, positions, pooling):
    """Concatenate, normalize each token, pool: written out per token."""
    per_token = []
    for position in positions:
        vector = torch.cat([hidden_states[layer][0, position] for layer in layers])
        per_token.append(vector / vector.norm())
    return per_token[-1] if pooling == "last" else torch.stack(per_token).mean(dim=0)


def test_feature_layers_are_floor_of_fraction_times_depth():
    assert feature_layer_indices(4, [0.25, 0.5, 0.75]) == [1, 2, 3]
    assert feature_layer_indices(30, [0.25, 0.5, 0.75]) == [7, 15, 22]  # SmolLM2-135M
    assert feature_layer_indices(28, [0.25, 0.5, 0.75]) == [7, 14, 21]  # Qwen2.5-1.5B
    assert feature_layer_indices(100, [0.29]) == [29]
    assert feature_layer_indices(4, [0.0, 1.0]) == [0, 4]
    with pytest.raises(ValueError):
        feature_layer_indices(4, [1.5])


def test_token_features_and_pooling_match_a_per_token_loop():
    torch.manual_seed(0)
    hidden_states = tuple(torch.randn(2, 10, 3, dtype=torch.float64) for _ in range(5))
    layers = [1, 3, 4]
    indices = torch.tensor([[0, 1, 2], [4, 5, 6], [7, 8, 9]])
    features = token_features(hidden_states, layers)
    assert features.shape == (2, 10, 9) and features.dtype == torch.float32
    for pooling in ("last", "mean"):
        pooled = pool_blocks(features, indices, pooling)
        for b in range(2):
            for block, positions in enumerate(indices.tolist()):
                single = tuple(h[b : b + 1] for h in hidden_states)
                expected = reference_feature(single, layers, positions, pooling)
                torch.testing.assert_close(pooled[b, block].double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "pooling, fractions, token_budget",
    [
        ("last", "[0.25, 0.5, 0.75]", 50),  # a tiny budget: one document / one rollout row per forward
        ("mean", "[0.25, 0.5, 0.75]", 16384),
        ("last", "[0.0, 1.0]", 100),  # embeddings and the pre-norm output of the last layer
    ],
)
@pytest.mark.parametrize("attention", ["blocks", "dense"])
def test_rollout_features_equal_separate_forwards_of_prefix_plus_rollout(
    tiny_model_dir, pooling, fractions, token_budget, attention
):
    config = make_config(
        f"features.pooling={pooling}",
        f"features.layer_fractions={fractions}",
        f"features.token_budget={token_budget}",
        f"features.attention={attention}",
    )
    extractor = FeatureExtractor(tiny_model_dir, config, device="cpu")
    batch = make_batch(num_docs=2, chunk_ids=[7, 3])
    features = extractor.extract(batch)

    layers = [int(f * TINY_LAYERS) for f in config.features.layer_fractions]
    assert features.chunk_ids == [7, 3]
    assert features.rollout_features.shape == (2, 8, 3, len(layers) * 64)  # [docs, NB, n, D]
    assert features.rollout_features.dtype == torch.float32
    model = reference_model(tiny_model_dir)
    docs, rollouts = batch.chunks.tokens, batch.tokens
    with torch.no_grad():
        for d in range(2):
            for j in range(3):
                for k in range(8):
                    prefix_length = 8 + 4 * k
                    sequence = torch.cat([docs[d, :prefix_length], rollouts[d, j, k]])
                    hidden = model(input_ids=sequence[None], output_hidden_states=True).hidden_states
                    expected = reference_feature(hidden, layers, range(prefix_length, prefix_length + 4), pooling)
                    torch.testing.assert_close(features.rollout_features[d, k, j].double(), expected, atol=1e-5, rtol=0)


def test_block_attention_with_a_padded_last_group_equals_separate_forwards(tiny_model_dir):
    # T=100, G=4, one sample per row: groups of K=6 blocks, NB=23, so the last group holds one padding block.
    config = make_config("data.chunk_length=100", "features.pooling=mean", "features.attention=blocks")
    plan = BlockPlan.from_config(config)
    assert blocks_per_group(plan) == 6 and plan.num_blocks == 23
    generator = torch.Generator().manual_seed(5)
    docs = torch.randint(3, 500, (1, 100), generator=generator)
    rollouts = torch.randint(3, 500, (1, 3, plan.num_blocks, 4), generator=generator)
    batch = RolloutBatch(ChunkBatch([0], docs, step=0), rollouts, torch.zeros(rollouts.shape), weight_version=0)
    features = FeatureExtractor(tiny_model_dir, config, device="cpu").extract(batch)

    layers = [int(f * TINY_LAYERS) for f in config.features.layer_fractions]
    model = reference_model(tiny_model_dir)
    with torch.no_grad():
        for j in range(3):
            for k in (0, plan.num_blocks - 2, plan.num_blocks - 1):
                prefix_length = int(plan.prefix_lengths[k])
                sequence = torch.cat([docs[0, :prefix_length], rollouts[0, j, k]])
                hidden = model(input_ids=sequence[None], output_hidden_states=True).hidden_states
                expected = reference_feature(hidden, layers, range(prefix_length, prefix_length + 4), "mean")
                torch.testing.assert_close(features.rollout_features[0, k, j].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_ground_truth_features_equal_a_plain_forward_of_the_document(tiny_model_dir, pooling):
    config = make_config(f"features.pooling={pooling}")
    features = FeatureExtractor(tiny_model_dir, config, device="cpu").extract(make_batch(num_docs=2, seed=1))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    docs = make_batch(num_docs=2, seed=1).chunks.tokens
    with torch.no_grad():
        for d in range(2):
            hidden = model(input_ids=docs[d : d + 1], output_hidden_states=True).hidden_states
            for k in range(8):
                window = range(8 + 4 * k, 8 + 4 * k + 4)
                expected = reference_feature(hidden, [1, 2, 3], window, pooling)
                torch.testing.assert_close(features.gt_features[d, k].double(), expected, atol=1e-5, rtol=0)


def test_micro_batching_does_not_change_features(tiny_model_dir):
    batch = make_batch(num_docs=3, seed=2)
    one_at_a_time = FeatureExtractor(tiny_model_dir, make_config("features.token_budget=1")).extract(batch)
    all_at_once = FeatureExtractor(tiny_model_dir, make_config("features.token_budget=100000")).extract(batch)
    torch.testing.assert_close(one_at_a_time.rollout_features, all_at_once.rollout_features, atol=1e-6, rtol=0)
    torch.testing.assert_close(one_at_a_time.gt_features, all_at_once.gt_features, atol=1e-6, rtol=0)


def test_only_layers_up_to_the_deepest_feature_layer_are_loaded_and_dtype_follows_config(tiny_model_dir):
    batch = make_batch(num_docs=1, seed=3)
    extractor = FeatureExtractor(tiny_model_dir, make_config("model.dtype=bfloat16"))
    assert len(extractor.model.layers) == 3  # layers 1, 2, 3 of 4
    assert next(extractor.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in extractor.model.parameters())
    low_precision = extractor.extract(batch)
    full_precision = FeatureExtractor(tiny_model_dir, make_config()).extract(batch)
    assert low_precision.rollout_features.dtype == torch.float32
    torch.testing.assert_close(low_precision.rollout_features, full_precision.rollout_features, atol=2e-2, rtol=0)
    torch.testing.assert_close(low_precision.gt_features, full_precision.gt_features, atol=2e-2, rtol=0)


def test_wrong_rollout_shape_is_refused(tiny_model_dir):
    batch = make_batch(num_docs=1)
    batch.tokens = batch.tokens[..., :3]
    with pytest.raises(ValueError, match="rollout tokens must be"):
        FeatureExtractor(tiny_model_dir, make_config()).extract(batch)


def test_a_worker_alone_on_the_node_embeds_on_every_core_for_that_call_only(tiny_model_dir, monkeypatch):
    from ebft import cpu_threads
    from ebft.features.pool import FeatureWorker

    worker = FeatureWorker(tiny_model_dir, make_config())
    threads_seen = []
    extract = worker.extractor.extract
    monkeypatch.setattr(
        worker.extractor, "extract", lambda b: threads_seen.append(torch.get_num_threads()) or extract(b)
    )
    before = torch.get_num_threads()
    cpu_threads._set_num_threads(1)
    try:
        batch = make_batch(num_docs=1)
        worker.extract(batch)
        worker.extract(batch, alone=True)
        assert threads_seen == [1, cpu_threads.node_cores()] and torch.get_num_threads() == 1
    finally:
        cpu_threads._set_num_threads(before)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def documents(batch, start, stop):
    chunks = ChunkBatch(batch.chunks.chunk_ids[start:stop], batch.chunks.tokens[start:stop], batch.chunks.step)
    return RolloutBatch(chunks, batch.tokens[start:stop], batch.behavior_logprobs[start:stop], batch.weight_version)


@pytest.mark.slow
def test_two_workers_on_two_shards_return_the_features_of_one_worker_on_the_whole_batch(ray_cluster, tiny_model_dir):
    config = make_config("resources.features.num_actors=2", "resources.features.cpus_per_actor=0.5")
    workers = [create_feature_worker(config, tiny_model_dir, None, i) for i in range(2)]
    assert ray.get([worker.feature_dim.remote() for worker in workers], timeout=120) == [3 * 64, 3 * 64]

    batch = make_batch(num_docs=3, seed=4, chunk_ids=[30, 10, 20])
    # As the controller shards a step: shard i to worker i mod N, the rollouts passed by reference.
    shards = [
        workers[0].extract.remote(ray.put(documents(batch, 0, 2))),
        workers[1].extract.remote(documents(batch, 2, 3)),
    ]
    whole = ray.get(workers[0].extract.remote(batch), timeout=120)
    first, second = ray.get(shards, timeout=120)
    local = FeatureExtractor(tiny_model_dir, config).extract(batch)

    assert first.chunk_ids + second.chunk_ids == whole.chunk_ids == [30, 10, 20]
    assert first.elapsed_s > 0 and whole.elapsed_s > 0
    for features in (torch.cat([first.rollout_features, second.rollout_features]), whole.rollout_features):
        torch.testing.assert_close(features, local.rollout_features, atol=1e-6, rtol=0)
    for features in (torch.cat([first.gt_features, second.gt_features]), whole.gt_features):
        torch.testing.assert_close(features, local.gt_features, atol=1e-6, rtol=0)
