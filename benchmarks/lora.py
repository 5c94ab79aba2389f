"""LoRA against full fine-tuning, side by side in one run: bytes and seconds per weight push, the learner's step time
and peak memory, generation tokens/s with the adapters merged vs served, for SmolLM2-135M at the demo's settings
(T = 128, 2 documents x 4 samples per step, ZeRO-2, `model.dtype: auto`), and on paper the learner's memory per GPU
for Qwen2.5-1.5B and 7B at the paper geometry.

Three arms, one after the other, each a `LearnerGroup` as a run starts it with its own rollout actor: full weights;
LoRA with `rollout.lora_sync: merged` (the worker merges the pushed adapters into the base and reloads,
ebft/actors/adapter_merge.py); LoRA with `lora_sync: adapter` (the worker registers them with vLLM's LoRA layers,
ebft/actors/adapter_serving.py). Each learner trains on the same rollouts (sampled by a real rollout actor; random
features stand in for the feature network, which the learner's cost does not depend on). A push is
`push_weights().confirm()` over `--transport`, the path a training step runs. Generation is the actor's `generate`
of the training chunks after the pushes, as a step runs it. Peak memory is the learner process's high-water mark
(VmHWM) after its steps.

    python benchmarks/lora.py [--rank 16] [--targets q_proj,k_proj,...] [--steps 3] [--pushes 3]
                              [--transport object_store|gloo]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit, quiet_environment, stdlib_chunks  # noqa: E402

quiet_environment()

import ray
import torch

from ebft.config import build_config  # noqa: E402
from ebft.messages import ChunkBatch, FeatureBatch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (hidden, intermediate, layers, kv heads x head dim, vocabulary, tied) of the models sized on paper.
PAPER_MODELS = {
    "Qwen2.5-1.5B": (1536, 8960, 28, 256, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 512, 152064, False),
}


def high_water_mib(actor) -> float:
    """The learner process's peak resident memory (VmHWM), MiB."""

    def read(_):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    return ray.get(actor.__ray_call__.remote(read))


def pushed_bytes(actor) -> int:
    """Bytes of one push: the sizes in the learner's weight stream's metadata."""

    def read(rank):
        return sum(
            torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in rank.learner.stream_weights().metadata
        )

    return ray.get(actor.__ray_call__.remote(read))


def measure(config, model_path: str, actor, chunks, rollouts, features, steps: int, pushes: int) -> dict[str, float]:
    from ebft.learner.group import LearnerGroup

    group = LearnerGroup(config, model_path)
    try:
        group.connect_weight_receivers([actor])
        step_s, push_s = [], []
        for _ in range(max(steps, pushes) + 1):  # the first step and push warm up
            rollouts.weight_version = group.weight_version
            started = time.perf_counter()
            group.train_step([rollouts], [features], group.weight_version)
            step_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert group.push_weights().confirm() == group.weight_version
            push_s.append(time.perf_counter() - started)
        generate_s = []
        for _ in range(3):
            batch = ray.get(actor.generate.remote(chunks))
            assert batch.weight_version == group.weight_version
            generate_s.append(batch.elapsed_s)
        return {
            "step_s": statistics.median(step_s[1:]),
            "push_s": min(push_s[1:]),
            "push_bytes": pushed_bytes(group.actors[0]),
            "peak_mib": high_water_mib(group.actors[0]),
            "generate_tok_s": batch.tokens.numel() / statistics.median(generate_s),
        }
    finally:
        group.shutdown()


def adapter_params(model_path: str, rank: int, targets: list[str]) -> int:
    """LoRA parameters of rank `rank` on `targets` of a Llama-like model: r x (in + out) per adapted linear."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    hidden, inter, kv = (
        c.hidden_size,
        c.intermediate_size,
        c.num_key_value_heads * (c.hidden_size // c.num_attention_heads),
    )
    sides = {
        "q_proj": hidden + hidden,
        "k_proj": hidden + kv,
        "v_proj": hidden + kv,
        "o_proj": hidden + hidden,
        "gate_proj": hidden + inter,
        "up_proj": hidden + inter,
        "down_proj": inter + hidden,
    }
    return c.num_hidden_layers * rank * sum(sides[t] for t in targets)


def paper_memory_gib(name: str, rank: int, gpus: int) -> tuple[float, float]:
    """Learner model state per GPU (GiB), full vs LoRA on every projection, ZeRO-2 over `gpus` ranks, bf16 weights:
    full = 2P (weights) + (2P gradients + 12P fp32 master and Adam moments) / gpus; LoRA = 2P + 16 P_lora (its
    gradients, master copy and moments are the adapters' only). Activations (gradient checkpointing) come on top
    and are the same for both."""
    hidden, inter, layers, kv, vocab, tied = PAPER_MODELS[name]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    params = layers * per_layer + vocab * hidden * (1 if tied else 2)
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter)]
    lora = layers * rank * (sum(a + b for a, b in shapes) + inter + hidden)
    gib = 1024**3
    return (2 * params + 14 * params / gpus) / gib, (2 * params + 16 * lora) / gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(TARGETS), help="model.lora.target_modules (default: all seven)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps of each learner")
    parser.add_argument("--pushes", type=int, default=3, help="timed pushes of each learner (one after each step)")
    parser.add_argument("--transport", choices=["object_store", "gloo"], default="object_store")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    args = parser.parse_args()

    from ebft.actors.pool import create_rollout_actor
    from ebft.model_sources import smollm2_path

    model_path = str(smollm2_path())
    raw = {
        "model": {"policy": model_path, "dtype": args.dtype},
        "data": {"chunk_length": 128},
        "sampling": {"context_length": 8, "stride": 8, "block_length": 8, "num_samples": 4},
        "rollout": {"kv_cache_gib": 0.25, "weight_transport": args.transport},
        "learner": {"zero_stage": 2, "micro_batch_docs": 1, "gradient_checkpointing": False},
        "optim": {"lr": 1e-5, "warmup_fraction": 0.0},
        "training": {"docs_per_step": 2, "steps": 100},
        "resources": {pool: {"num_actors": 1, "cpus_per_actor": 1} for pool in ("rollout", "features", "learner")},
    }
    full = build_config(raw)
    targets = args.targets.split(",")
    lora = {"rank": args.rank, "alpha": 2.0 * args.rank, "target_modules": targets}
    with_lora = {**raw, "model": {**raw["model"], "lora": lora}}
    arms = {
        "full": full,
        "merged": build_config(with_lora),
        "adapter": build_config({**with_lora, "rollout": {**raw["rollout"], "lora_sync": "adapter"}}),
    }
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        actor = create_rollout_actor(full, model_path, enforce_eager=True)
        chunks = ChunkBatch([0, 1], stdlib_chunks(model_path, 2, 128), step=0)
        rollouts = ray.get(actor.generate.remote(chunks))
        generator = torch.Generator().manual_seed(0)
        features = FeatureBatch(
            chunks.chunk_ids,
            torch.randn(2, full.num_blocks, 4, 3 * 576, generator=generator),
            torch.randn(2, full.num_blocks, 3 * 576, generator=generator),
        )
        measured = {}
        for name, config in arms.items():
            # Each LoRA arm pushes into an engine started with its config (merging or serving the adapters).
            receiver = actor if name == "full" else create_rollout_actor(config, model_path, enforce_eager=True)
            measured[name] = measure(config, model_path, receiver, chunks, rollouts, features, args.steps, args.pushes)
            print(f"{name}: {measured[name]}", flush=True)
            ray.kill(receiver)
    finally:
        ray.shutdown()

    ff, lo, ad = measured["full"], measured["merged"], measured["adapter"]
    print(f"SmolLM2-135M {full.model.dtype}, LoRA rank {args.rank} on {', '.join(targets)}, {args.transport}")
    print(f"{'':24}{'full':>11}{'LoRA merged':>13}{'LoRA served':>13}{'full/merged':>13}{'full/served':>13}")

    def row(label, key, scale=1.0, fmt="12.3f"):
        values = [m[key] * scale for m in (ff, lo, ad)]
        print(
            f"{label:24}{values[0]:{fmt}}{values[1]:{fmt}}{values[2]:{fmt}}"
            f"{values[0] / values[1]:13.2f}{values[0] / values[2]:13.2f}"
        )

    row("bytes per push (MiB)", "push_bytes", 2**-20, "11.1f")
    row("seconds per push", "push_s", fmt="13.3f")
    row("learner step (s)", "step_s", fmt="13.2f")
    row("learner peak (MiB)", "peak_mib", fmt="13.0f")
    row("generated tokens/s", "generate_tok_s", fmt="13.0f")
    step_tokens = rollouts.tokens.numel()
    rollout_s = {name: step_tokens / m["generate_tok_s"] + m["push_s"] for name, m in measured.items()}
    print(
        f"a step's rollout work (generate the step's chunks + one push): merged {rollout_s['merged']:.2f} s, "
        f"served {rollout_s['adapter']:.2f} s"
    )
    bytes_per_param = lo["push_bytes"] / adapter_params(model_path, args.rank, targets)
    for label, others in (("all seven projections", TARGETS), ("q, k, v, o", TARGETS[:4]), ("q, v", TARGETS[:3:2])):
        ratio = ff["push_bytes"] / (adapter_params(model_path, args.rank, others) * bytes_per_param)
        print(f"on paper, rank {args.rank} on {label}: {ratio:.0f}x fewer bytes per push than full weights")
    paper = {}
    for model in PAPER_MODELS:
        for gpus in (4, 8):
            full_gib, lora_gib = paper_memory_gib(model, args.rank, gpus)
            paper[f"{model}/{gpus}"] = {"full_gib": round(full_gib, 1), "lora_gib": round(lora_gib, 1)}
            print(
                f"on paper, {model}, ZeRO-2 over {gpus} GPUs: model state {full_gib:.1f} GiB per GPU full, "
                f"{lora_gib:.1f} GiB LoRA (activations on top, the same for both)"
            )
    emit(
        {
            "benchmark": "lora",
            "bytes_ratio": round(ff["push_bytes"] / lo["push_bytes"], 2),
            "push_time_ratio": {
                "merged": round(ff["push_s"] / lo["push_s"], 2),
                "served": round(ff["push_s"] / ad["push_s"], 2),
            },
            "step_time_ratio": round(ff["step_s"] / lo["step_s"], 3),
            "peak_memory_ratio": round(ff["peak_mib"] / lo["peak_mib"], 3),
            "served_over_merged_tok_s": round(ad["generate_tok_s"] / lo["generate_tok_s"], 3),
            "rollout_s_per_step": {k: round(v, 3) for k, v in rollout_s.items()},
            **{name: {k: round(v, 3) for k, v in m.items()} for name, m in measured.items()},
            "rank": args.rank,
            "targets": targets,
            "transport": args.transport,
            "dtype": full.model.dtype,
            "paper_model_state_gib": paper,
            "goal": "bytes_ratio >= 50 and push_time_ratio >= 10",
            "faster_lora_sync_here": min(("merged", "adapter"), key=rollout_s.get),
        }
    )


if __name__ == "__main__":
    main()
