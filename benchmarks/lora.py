"""LoRA against full fine-tuning, side by side in one run: bytes and seconds per weight push, the learner's step time
and peak memory, for SmolLM2-135M at the demo's settings (T = 128, 2 documents x 4 samples per step, ZeRO-2,
`model.dtype: auto`), and on paper the learner's memory per GPU for Qwen2.5-1.5B and 7B at the paper geometry.

Each learner is a `LearnerGroup` as a run starts it, one after the other, training on the same rollouts (sampled by
a real rollout actor; random features stand in for the feature network, which the learner's cost does not depend
on). A push is `push_weights().confirm()` over `--transport` into that rollout actor, the path a training step runs:
full weights carry the whole model, LoRA the adapters alone, which the worker merges into the base
(ebft/actors/adapter_merge.py). Peak memory is the learner process's high-water mark (VmHWM) after its steps.

    python benchmarks/lora.py [--rank 16] [--steps 3] [--pushes 3] [--transport object_store|gloo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit, stdlib_chunks  # noqa: E402

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


def measure(config, model_path: str, actor, rollouts, features, steps: int, pushes: int) -> dict[str, float]:
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
        return {
            "step_s": statistics.median(step_s[1:]),
            "push_s": min(push_s[1:]),
            "push_bytes": pushed_bytes(group.actors[0]),
            "peak_mib": high_water_mib(group.actors[0]),
        }
    finally:
        group.shutdown()


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
    lora = build_config({**raw, "model": {**raw["model"], "lora": {"rank": args.rank, "alpha": 2.0 * args.rank}}})
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
        for name, config in (("full", full), ("lora", lora)):
            # The LoRA learner pushes into an engine that merges its adapters: one started with the LoRA config.
            receiver = actor if name == "full" else create_rollout_actor(config, model_path, enforce_eager=True)
            measured[name] = measure(config, model_path, receiver, rollouts, features, args.steps, args.pushes)
            print(f"{name}: {measured[name]}", flush=True)
    finally:
        ray.shutdown()

    ff, lo = measured["full"], measured["lora"]
    print(f"SmolLM2-135M {full.model.dtype}, LoRA rank {args.rank} on {', '.join(TARGETS)}, {args.transport}")
    print(f"{'':22}{'full':>12}{'LoRA':>12}{'full/LoRA':>11}")
    print(
        f"{'bytes per push':22}{ff['push_bytes'] / 2**20:10.1f}Mi{lo['push_bytes'] / 2**20:10.1f}Mi"
        f"{ff['push_bytes'] / lo['push_bytes']:11.1f}"
    )
    print(f"{'seconds per push':22}{ff['push_s']:12.3f}{lo['push_s']:12.3f}{ff['push_s'] / lo['push_s']:11.1f}")
    print(f"{'learner step (s)':22}{ff['step_s']:12.2f}{lo['step_s']:12.2f}{ff['step_s'] / lo['step_s']:11.2f}")
    print(
        f"{'learner peak (MiB)':22}{ff['peak_mib']:12.0f}{lo['peak_mib']:12.0f}{ff['peak_mib'] / lo['peak_mib']:11.2f}"
    )
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
            "push_time_ratio": round(ff["push_s"] / lo["push_s"], 2),
            "step_time_ratio": round(ff["step_s"] / lo["step_s"], 3),
            "peak_memory_ratio": round(ff["peak_mib"] / lo["peak_mib"], 3),
            "full": {k: round(v, 3) for k, v in ff.items()},
            "lora": {k: round(v, 3) for k, v in lo.items()},
            "rank": args.rank,
            "transport": args.transport,
            "dtype": full.model.dtype,
            "paper_model_state_gib": paper,
            "goal": "bytes_ratio >= 50 and push_time_ratio >= 10",
        }
    )


if __name__ == "__main__":
    main()
