"""model.lora on the learner: steps against plain PEFT + torch AdamW in float64, the merged weight stream against PEFT's
own merge, exact resume from a LoRA checkpoint, its PEFT adapter, and the target-module check."""

from __future__ import annotations

import peft
import pytest
import ray
import torch
from helpers import TINY_LORA as LORA
from helpers import make_tiny_llama, transformers_greedy
from learner_reference import (
    N_SAMPLES,
    T,
    capture_gradients,
    float64_model,
    make_batch,
    make_config,
    reference_logprobs,
    reference_loss,
    reference_update,
)
from transformers import AutoModelForCausalLM

from ebft.actors.adapter_merge import AdapterBase, merged_weights
from ebft.actors.adapter_serving import ServedAdapter
from ebft.config import ConfigError, LoraConfig, build_config
from ebft.evaluation.checkpoint_eval import resolve_evaluated_model
from ebft.learner import checkpoint as ckpt
from ebft.learner.engine import LearnerRank
from ebft.learner.lora import adapter_state_dict
from ebft.learner.state_dict import iter_state_dict, state_dict_metadata
from ebft.learner.weight_sender import state_dict_to_update
from ebft.lora_targets import check_policy_targets
from ebft.messages import ChunkBatch, WeightUpdate
from ebft.model_sources import resolve_run_models

pytestmark = pytest.mark.usefixtures("one_thread")

NO_REMOTE = {"trust_remote_code": False}
PROMPTS = [[5, 17, 42, 7], [100, 3, 250, 9, 11]]


def lora_config(**sections):
    model = {"lora": LORA, **sections.pop("model", {})}
    return make_config(model=model, **sections)


def adapters(learner) -> dict[str, torch.Tensor]:
    return adapter_state_dict(learner.engine.module, zero3=learner.config.learner.zero_stage == 3, rank=0)


def peft_reference(model_dir, config, adapter_weights: dict[str, torch.Tensor], dtype=torch.float64):
    """The base model with PEFT adapters of the run's LoRA settings, set to `adapter_weights` (PEFT's names)."""
    lora = config.model.lora
    if dtype == torch.float64:
        base = float64_model(model_dir)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules, lora_dropout=0.0),
        autocast_adapter_dtype=False,
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(adapter_weights)
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(adapter_weights[name].to(dtype))
    return model


def sft_reference_loss(model, chunks: list[ChunkBatch]) -> torch.Tensor:
    nlls = []
    for doc in torch.cat([c.tokens for c in chunks]):
        logp = torch.log_softmax(model(input_ids=doc[None]).logits[0, : T - 1], dim=-1)
        nlls.append(-sum(logp[i, doc[i + 1]] for i in range(T - 1)) / (T - 1))
    return torch.stack(nlls).mean()


def sft_chunks(seed: int) -> list[ChunkBatch]:
    gen = torch.Generator().manual_seed(seed)
    return [ChunkBatch([2 * i, 2 * i + 1], torch.randint(3, 500, (2, T), generator=gen), 0) for i in range(2)]


def assert_trainable_match(actual: dict[str, torch.Tensor], model, *, grads: bool, atol: float):
    expected = {n: (p.grad if grads else p.detach()) for n, p in model.named_parameters() if p.requires_grad}
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].double(), value, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- steps


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, stage, checkpointing, offload",
    [
        ("ebft", 0, False, False),
        ("ebft", 1, False, True),
        ("ebft", 2, True, False),
        ("ebft", 3, True, False),
        ("sft", 2, True, False),
        ("sft", 3, False, False),
    ],
    ids=[
        "ebft-zero0",
        "ebft-zero1-offload",
        "ebft-zero2-checkpointing",
        "ebft-zero3-checkpointing",
        "sft-zero2-checkpointing",
        "sft-zero3",
    ],
)
def test_lora_steps_equal_plain_peft_and_adamw_in_float64(tiny_model_dir, method, stage, checkpointing, offload):
    """Two steps (the first moves only B: PEFT starts B at zero, so A has no gradient yet), each with the adapters'
    gradients, the loss, the clipped AdamW update at the warmup LR. (That the base stays frozen is checked on the
    exported weights below.)"""
    config = lora_config(
        training={"method": method, "docs_per_step": 4, "steps": 10},
        learner={"zero_stage": stage, "gradient_checkpointing": checkpointing, "offload_optimizer": offload},
        optim={"grad_clip": 0.05, "weight_decay": 0.1, "warmup_fraction": 0.2},
    )
    learner = LearnerRank(config, tiny_model_dir)
    gradients = capture_gradients(learner)
    model = peft_reference(tiny_model_dir, config, adapters(learner))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, betas=config.optim.betas, weight_decay=0.1)
    for version, lr in enumerate([5e-4, 1e-3]):
        optimizer.zero_grad()
        if method == "ebft":
            batch = make_batch(4, seed=10 * stage + version, version=version)
            metrics = learner.train_step([batch[0]], [batch[1]], current_version=version)
            loss = reference_loss(model, [batch], config, current_version=version)[0]
        else:
            chunks = sft_chunks(100 + version)
            metrics = learner.sft_step(chunks, current_version=version)
            loss = sft_reference_loss(model, chunks)
        loss.backward()
        assert metrics["train/loss"] == pytest.approx(loss.item(), abs=1e-5)
        assert_trainable_match(gradients, model, grads=True, atol=1e-5)
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable]))
        assert metrics["train/grad_norm"] == pytest.approx(float(grad_norm), rel=1e-5) and grad_norm > 0.05
        reference_update(model, optimizer, lr, config.optim.grad_clip)
    assert all(g.abs().max() > 0 for name, g in gradients.items() if "lora_A" in name)
    assert_trainable_match(adapters(learner), model, grads=False, atol=2e-5)
    learner.close()


# ----------------------------------------------------------------------------- the weights the engines get


def trained_learner(model_dir, stage: int, steps: int = 2) -> LearnerRank:
    """A LoRA learner after a few steps at a LR large enough to move both A and B well away from their start."""
    learner = LearnerRank(lora_config(learner={"zero_stage": stage}, optim={"lr": 3e-2}), model_dir)
    for version in range(steps):
        batch = make_batch(4, seed=60 + version, version=version)
        learner.train_step([batch[0]], [batch[1]], current_version=version)
    return learner


@pytest.mark.slow
@pytest.mark.parametrize("stage, tied", [(2, False), (3, True)], ids=["zero2", "zero3-tied"])
def test_merged_export_and_the_engines_merge_of_a_push_are_peft_merge_and_unload(
    tiny_model_dir, tiny_tied_model_dir, stage, tied, monkeypatch
):
    """Checkpoints export the merged weights (state_dict.py); a push carries the adapters alone, which a rollout
    worker merges into the base (adapter_merge.py): both are bit for bit PEFT's merge_and_unload."""
    import deepspeed

    model_dir = tiny_tied_model_dir if tied else tiny_model_dir
    learner = trained_learner(model_dir, stage)
    trained = adapters(learner)
    merged = peft_reference(model_dir, learner.config, trained, dtype=torch.float32).merge_and_unload()
    expected = merged.state_dict()
    if tied:  # the stream, like an HF checkpoint, has the tied output layer once, as the input embedding
        del expected["lm_head.weight"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()

    gathered: list[int] = []
    gathered_parameters = deepspeed.zero.GatheredParameters

    def recording(params, *args, **kwargs):
        gathered.append(sum(p.ds_numel for p in params))
        return gathered_parameters(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    module, zero3 = learner.engine.module, stage == 3
    pairs = list(iter_state_dict(module, zero3=zero3, rank=0, device="cpu"))
    metadata = state_dict_metadata(module)
    monkeypatch.undo()
    if stage == 3:  # a linear with its adapters at a time, or the embedding (the largest module): never the model
        embedding = learner.engine.module.get_input_embeddings().weight.ds_numel
        assert max(gathered) == embedding < sum(t.numel() for _, t in pairs) // 4
    assert [name for name, _ in pairs] == list(expected)
    assert metadata == [(name, list(t.shape), t.dtype) for name, t in pairs]
    for name, tensor in pairs:
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
        adapted = any(f".{target}." in name for target in LORA["target_modules"])
        assert torch.equal(tensor, base[name]) != adapted, name  # adapted layers moved; nothing else did
    push = learner.stream_weights("cpu")
    pushed_adapters = dict(push.tensors)
    assert push.metadata == [(name, list(t.shape), t.dtype) for name, t in pushed_adapters.items()]
    assert len(pushed_adapters) == len(trained) and all(".lora_" in name for name in pushed_adapters)
    base_of_push = AdapterBase(str(model_dir), LORA["alpha"] / LORA["rank"], "float32")
    engine_merged = dict(merged_weights(pushed_adapters, base_of_push))
    assert engine_merged.keys() == expected.keys()
    with pytest.raises(ValueError, match="missing"):  # at the call, before the engine's reload has begun
        merged_weights({n: t for n, t in pushed_adapters.items() if ".lora_B." not in n}, base_of_push)
    for name, tensor in engine_merged.items():
        assert torch.equal(tensor, expected[name]), name
    # Exporting left the trained adapters as they were.
    assert all(torch.equal(t, trained[n]) for n, t in adapters(learner).items())
    learner.close()


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("stage, dtype", [(2, "float32"), (3, "bfloat16")], ids=["zero2-fp32", "zero3-bf16"])
def test_lora_checkpoint_resumes_exactly(tiny_model_dir, tmp_path, stage, dtype):
    """Adapter dropout on: the resumed step draws the same masks from the checkpoint's RNG state."""
    config = make_config(
        model={"dtype": dtype, "lora": {**LORA, "dropout": 0.1}}, learner={"zero_stage": stage}, optim={"lr": 1e-2}
    )
    batches = [make_batch(4, seed=70 + i, version=i, first_chunk=4 * i) for i in range(3)]
    learner = LearnerRank(config, tiny_model_dir)
    for i, (rollouts, features) in enumerate(batches):
        learner.train_step([rollouts], [features], current_version=i)
        learner.save_checkpoint(ckpt.checkpoint_path(tmp_path, i + 1), {"data_position": 4 * (i + 1)})
    final_adapters, final_weights = adapters(learner), learner.full_state_dict()

    resumed = LearnerRank(config, tiny_model_dir)
    extra = resumed.load_checkpoint(ckpt.checkpoint_path(tmp_path, 2))
    assert extra == {"data_position": 8} and (resumed.step, resumed.weight_version) == (2, 2)
    resumed.train_step([batches[2][0]], [batches[2][1]], current_version=2)
    assert all(torch.equal(t, final_adapters[n]) for n, t in adapters(resumed).items())
    replayed = resumed.full_state_dict()
    assert all(torch.equal(replayed[n], final_weights[n]) for n in final_weights)

    # DeepSpeed's part of the checkpoint holds the adapters, not a second copy of the frozen base.
    (model_states,) = (tmp_path / "step_00000003" / ckpt.DEEPSPEED_DIR / ckpt.DEEPSPEED_TAG).glob("*model_states.pt")
    module_state = torch.load(model_states, weights_only=False)["module"]
    assert module_state and all(".lora_" in name for name in module_state)
    learner.close()
    resumed.close()


@pytest.mark.slow
def test_lora_checkpoint_holds_a_peft_adapter_and_a_merged_model(tiny_model_dir, tmp_path):
    """`adapter/` loads with PeftModel.from_pretrained over the base, the top folder with transformers (what `ebft
    eval` and vLLM load, the run folder resolving to it): both give the learner's logits."""
    learner = trained_learner(tiny_model_dir, stage=2)
    path = learner.save_checkpoint(ckpt.checkpoint_path(tmp_path / "checkpoints", 2), {})
    assert (path / ckpt.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert not (path / "adapter_config.json").exists()  # transformers would load the adapter over its base instead
    tokens = make_batch(2, seed=80, version=0)[0].chunks.tokens

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=tokens).logits

    def base_model():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    own = logits(learner.engine.module)
    adapter = peft.PeftModel.from_pretrained(base_model(), path / ckpt.ADAPTER_DIR)
    assert isinstance(adapter, peft.PeftModelForCausalLM)
    torch.testing.assert_close(logits(adapter), own, atol=1e-5, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.testing.assert_close(logits(merged), own, atol=1e-5, rtol=0)
    assert (logits(base_model()) - own).abs().max() > 1e-2
    assert resolve_evaluated_model(str(tmp_path)) == str(path)
    nll = -torch.log_softmax(logits(merged)[:, :-1], -1).gather(-1, tokens[:, 1:, None]).mean((1, 2))
    torch.testing.assert_close(learner.document_ce(tokens), nll, atol=1e-5, rtol=0)  # the held-out CE
    learner.close()


def pushed(learner) -> WeightUpdate:
    """What the object-store transport carries for the learner's current weights: its weight stream, put once."""
    return state_dict_to_update(dict(learner.stream_weights().tensors), learner.weight_version)


@pytest.mark.slow
def test_rollout_worker_merges_pushed_adapters_and_samples_from_the_lora_policy(tmp_path_factory, tmp_path):
    """vLLM loads a LoRA checkpoint (its merged HF folder), then a push that carries only the adapters, which the
    worker merges into the base policy: its log-probs of its own samples are the float64 PEFT model's each time."""
    from ebft.actors.rollout import RolloutWorker

    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-vllm-lora"), tie_word_embeddings=True, layers=2)
    learner = trained_learner(model_dir, stage=2, steps=1)
    config = learner.config.model_copy(
        update={
            "model": learner.config.model.model_copy(update={"policy": str(model_dir)}),
            "rollout": learner.config.rollout.model_copy(update={"kv_cache_gib": 0.05}),
        }
    )
    path = learner.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), {})
    worker = RolloutWorker(config, str(path), enforce_eager=True)
    chunks = ChunkBatch([0, 1], make_batch(2, seed=90, version=0)[0].chunks.tokens, step=0)

    def assert_sampled_from_learner():
        sampled = worker.generate(chunks)
        model = peft_reference(model_dir, config, adapters(learner))
        with torch.no_grad():
            expected = [
                [reference_logprobs(model, chunks.tokens[i], sampled.tokens[i, j], 0.7)[0] for j in range(N_SAMPLES)]
                for i in range(2)
            ]
        torch.testing.assert_close(
            sampled.behavior_logprobs.double(), torch.stack([torch.stack(e) for e in expected]), atol=2e-5, rtol=0
        )

    try:
        assert_sampled_from_learner()
        batch = make_batch(4, seed=91, version=1)
        learner.train_step([batch[0]], [batch[1]], current_version=1)
        update = pushed(learner)
        # Only the adapters travel: lora_A and lora_B of each adapted linear, a fraction of the model's bytes.
        lora_linears = 5 * 2  # LORA's five target modules in each of the two layers
        assert len(update.raw) == 2 * lora_linears and all(".lora_A." in n or ".lora_B." in n for n in update.raw)
        full_bytes = sum(t.numel() * t.element_size() for t in learner.full_state_dict().values())
        assert sum(a.nbytes for a in update.raw.values()) < full_bytes / 4
        assert worker.update_weights(update) == 2
        assert_sampled_from_learner()
    finally:
        worker.shutdown()
        learner.close()


@pytest.mark.slow
def test_an_engine_serving_adapters_samples_each_pushed_version_and_never_the_one_before(tmp_path_factory):
    """rollout.lora_sync: adapter. vLLM's LoRA layers serve adapters registered from the pushed tensors in memory:
    the log-probs of the engine's own samples are the float64 PEFT model's at the base, after a push, and after the
    next push, whose policy is not the one before."""
    from ebft.actors.rollout import RolloutWorker

    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-served-lora"), tie_word_embeddings=True, layers=2)
    learner = LearnerRank(lora_config(optim={"lr": 3e-2}), model_dir)
    config = learner.config.model_copy(
        update={
            "model": learner.config.model.model_copy(update={"policy": str(model_dir)}),
            "rollout": learner.config.rollout.model_copy(update={"kv_cache_gib": 0.05, "lora_sync": "adapter"}),
        }
    )
    worker = RolloutWorker(config, str(model_dir), enforce_eager=True)
    chunks = ChunkBatch([0, 1], make_batch(2, seed=92, version=0)[0].chunks.tokens, step=0)

    def sampled_and_reference(adapter_weights):
        sampled = worker.generate(chunks)
        model = peft_reference(model_dir, config, adapter_weights)
        with torch.no_grad():
            expected = [
                [reference_logprobs(model, chunks.tokens[i], sampled.tokens[i, j], 0.7)[0] for j in range(N_SAMPLES)]
                for i in range(2)
            ]
        return sampled.behavior_logprobs.double(), torch.stack([torch.stack(e) for e in expected])

    try:
        versions = [adapters(learner)]
        torch.testing.assert_close(*sampled_and_reference(versions[0]), atol=2e-5, rtol=0)  # B = 0: the base
        for version in (1, 2):
            batch = make_batch(4, seed=93 + version, version=version - 1)
            learner.train_step([batch[0]], [batch[1]], current_version=version - 1)
            versions.append(adapters(learner))
            assert worker.update_weights(pushed(learner)) == version == learner.weight_version
            torch.testing.assert_close(*sampled_and_reference(versions[version]), atol=2e-5, rtol=0)
        served, stale = sampled_and_reference(versions[1])
        assert (served - stale).abs().max() > 1e-3  # the version before would have sampled differently
    finally:
        worker.shutdown()
        learner.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "transport, lora_sync",
    [("gloo", "merged"), ("gloo", "adapter"), ("object_store", "merged")],
    ids=["gloo-merged", "gloo-adapter", "object_store-merged"],
)
def test_a_lora_push_reaches_a_multiprocess_engine(
    local_ray, tmp_path_factory, tmp_path, monkeypatch, transport, lora_sync
):
    """The transports carry adapters the way they carry weights, into engines in their own EngineCore processes as
    GPU engines run (the object store's settings then cross a process as msgpack), which merge or serve them; their
    greedy output is then that of PEFT's own merge of the checkpoint's adapter."""
    from ebft.actors import pool
    from ebft.learner.group import LearnerGroup

    monkeypatch.setitem(pool.CPU_ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING", "1")

    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-gloo-lora"), tie_word_embeddings=True, layers=2)
    trained = trained_learner(model_dir, stage=2, steps=1)
    path = trained.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), {})
    raw = trained.config.model_dump(mode="json")
    trained.close()
    raw["model"]["policy"] = str(model_dir)
    raw["resources"] = {pool: {"cpus_per_actor": 0.5, "threads": 1} for pool in ("rollout", "features", "learner")}
    raw["rollout"].update(kv_cache_gib=0.125, weight_transport=transport, weight_buffer_mib=0.01, lora_sync=lora_sync)
    config = build_config(raw)
    actor = pool.create_rollout_actor(config, str(model_dir), max_model_len=64)
    learner = LearnerGroup(config, str(model_dir))
    try:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        before = [[transformers_greedy(base, p, 8)] for p in PROMPTS]
        merged = peft.PeftModel.from_pretrained(base, path / ckpt.ADAPTER_DIR).merge_and_unload().eval()
        expected = [[transformers_greedy(merged, p, 8)] for p in PROMPTS]
        assert expected != before
        assert ray.get(actor.complete.remote(PROMPTS, max_tokens=8)) == before
        learner.load_checkpoint(path)
        learner.connect_weight_receivers([actor])
        assert learner.push_weights().confirm() == learner.weight_version
        assert ray.get(actor.complete.remote(PROMPTS, max_tokens=8)) == expected
    finally:
        learner.shutdown()
        ray.kill(actor)


# ----------------------------------------------------------------------------- configuration


def test_unknown_target_module_is_a_config_error_naming_the_models_linear_layers(tiny_model_dir, tiny_tied_model_dir):
    names = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    with pytest.raises(ConfigError, match=f"`qkv_proj` matches no layer of LlamaForCausalLM; .*named {names}"):
        check_policy_targets(str(tiny_model_dir), LoraConfig(target_modules=["q_proj", "qkv_proj"]), **NO_REMOTE)
    with pytest.raises(ConfigError, match="`mlp` matches a layer that is not linear"):
        check_policy_targets(str(tiny_model_dir), LoraConfig(target_modules=["mlp"]), **NO_REMOTE)
    with pytest.raises(ConfigError, match="`lm_head` is the output layer, which this model ties"):
        check_policy_targets(str(tiny_tied_model_dir), LoraConfig(target_modules=["lm_head"]), **NO_REMOTE)
    check_policy_targets(str(tiny_model_dir), LoraConfig(target_modules=["lm_head", "self_attn.q_proj"]), **NO_REMOTE)
    check_policy_targets(str(tiny_model_dir), LoraConfig(), **NO_REMOTE)  # the default: Llama's projections

    # A run checks before any actor starts, where it resolves its models.
    run = build_config({"model": {"policy": str(tiny_model_dir), "lora": {"target_modules": ["c_attn"]}}})
    with pytest.raises(ConfigError, match="`c_attn` matches no layer"):
        resolve_run_models(run)
    assert resolve_run_models(run.model_copy(update={"model": run.model.model_copy(update={"lora": None})}))


def test_lora_section_is_off_by_default_and_validated():
    assert build_config({}).model.lora is None
    lora = build_config({}, ["model.lora.rank=8"]).model.lora
    assert (lora.rank, lora.alpha, lora.dropout) == (8, 32.0, 0.0) and "down_proj" in lora.target_modules
    with pytest.raises(ConfigError, match="did you mean `model.lora.rank`"):
        build_config({}, ["model.lora.r=8"])
    with pytest.raises(ConfigError, match="name one or more linear layers"):
        build_config({}, ["model.lora.target_modules=[]"])
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        build_config({}, ["model.lora.dropout=1.0"])
    assert build_config({}).rollout.lora_sync == "merged"
    with pytest.raises(ConfigError, match="lora_sync=adapter serves LoRA adapters: set model.lora, or set rollout"):
        build_config({}, ["rollout.lora_sync=adapter"])
    with pytest.raises(ConfigError, match="lower model.lora.rank"):
        build_config({}, ["rollout.lora_sync=adapter", "model.lora.rank=1024"])
    served = build_config({}, ["rollout.lora_sync=adapter", "model.lora.rank=20"])
    assert ServedAdapter.from_config(served).engine_options()["max_lora_rank"] == 32  # vLLM's next size up
    assert AdapterBase.from_config(served) is None  # served, not merged


# ----------------------------------------------------------------------------- whole runs
