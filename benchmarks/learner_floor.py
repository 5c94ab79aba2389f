"""Learner floor: the learner's `train_step` tokens/s against a plain causal forward + backward of the same model.

The learner's step (`LearnerRank.train_step`, in this process, world size 1, DeepSpeed ZeRO-2 with the
run's config) trains on `--docs` documents of the demo geometry: each a packed row of T + n*NB*G tokens
with the block mask and positions (ebft/layout.py), the sliced log-softmax, the advantages, the
update, the schedule. The floor is what the same model costs by itself on the same number of tokens:
one plain causal forward + backward per row of the same length (HF's own loss, no mask, no optimizer),
same dtype, same threads. Both are timed alternately, best of `--repeats`, and `ratio` = learner
tokens/s / floor tokens/s (goal >= 0.8). `--profile` prints torch.profiler's top operators of one step.
The last line is JSON.

    python benchmarks/learner_floor.py [--threads N] [--docs 2] [--repeats 3] [--attention blocks|dense] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit, stdlib_chunks  # noqa: E402

from ebft.config import load_config  # noqa: E402
from ebft.cpu_threads import node_cores, set_threads  # noqa: E402
from ebft.layout import BlockPlan  # noqa: E402
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def step_batch(plan: BlockPlan, docs: torch.Tensor, version: int, seed: int, feature_dim: int):
    generator = torch.Generator().manual_seed(seed)
    n, NB, G = plan.samples, plan.num_blocks, plan.block_length
    rollouts = torch.randint(3, 40000, (docs.shape[0], n, NB, G), generator=generator)
    chunks = ChunkBatch(list(range(docs.shape[0])), docs, step=version)
    batch = RolloutBatch(chunks, rollouts, torch.full(rollouts.shape, -1.0), weight_version=version)
    features = FeatureBatch(
        chunks.chunk_ids,
        torch.randn(docs.shape[0], NB, n, feature_dim, generator=generator),
        torch.randn(docs.shape[0], NB, feature_dim, generator=generator),
    )
    return [batch], [features]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=node_cores())
    parser.add_argument("--docs", type=int, default=2, help="documents per step (the demo's docs_per_step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="blocks", choices=["dense", "blocks"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. learner.gradient_checkpointing=true")
    args = parser.parse_args()
    set_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from ebft.learner.engine import LearnerRank
    from ebft.model_sources import smollm2_path

    model_path = str(smollm2_path())
    config = load_config(
        CONFIG,
        [
            f"training.docs_per_step={args.docs}",
            "training.steps=1000",
            f"learner.attention={args.attention}",
            *args.overrides,
        ],
    )
    dtype = getattr(torch, config.model.dtype)
    learner = LearnerRank(config, model_path)
    plan = replace(BlockPlan.from_config(config), samples=config.sampling.num_samples)
    docs = stdlib_chunks(model_path, args.docs, plan.chunk_length)
    rows, row_tokens = args.docs, plan.packed_length

    floor_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    # What the feature network returns: one hidden state per chosen layer, concatenated.
    feature_dim = len(config.features.layer_fractions) * floor_model.config.hidden_size
    floor_model.train()
    floor_rows = torch.randint(3, 40000, (rows, row_tokens), generator=torch.Generator().manual_seed(1))
    micro = config.learner.micro_batch_docs

    def floor_step() -> float:
        started = time.perf_counter()
        for start in range(0, rows, micro):
            batch = floor_rows[start : start + micro]
            floor_model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        floor_model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def learner_step() -> float:
        version = learner.weight_version
        rollouts, features = step_batch(plan, docs, version, seed=version, feature_dim=feature_dim)
        started = time.perf_counter()
        learner.train_step(rollouts, features, version)
        return time.perf_counter() - started

    print(
        f"SmolLM2-135M {config.model.dtype}, {rows} rows x {row_tokens} tokens (T={plan.chunk_length}, "
        f"n={plan.samples}, NB={plan.num_blocks}), micro-batch {micro} docs, attention {args.attention}, "
        f"torch threads {torch.get_num_threads()} of {node_cores()} cores"
    )
    learner_step(), floor_step()  # warm-up
    best_learner = best_floor = float("inf")
    for _ in range(args.repeats):
        best_learner = min(best_learner, learner_step())
        best_floor = min(best_floor, floor_step())
    tokens = rows * row_tokens
    learner_rate, floor_rate = tokens / best_learner, tokens / best_floor
    print(
        f"learner train_step {best_learner:.2f} s ({learner_rate:.0f} tokens/s), plain forward + backward "
        f"{best_floor:.2f} s ({floor_rate:.0f} tokens/s) -> ratio {learner_rate / floor_rate:.2f}"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            learner_step()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))
    emit(
        {
            "benchmark": "learner_floor",
            "ratio": round(learner_rate / floor_rate, 3),
            "learner_s": round(best_learner, 3),
            "floor_s": round(best_floor, 3),
            "tokens": tokens,
            "dtype": config.model.dtype,
            "attention": args.attention,
            "threads": torch.get_num_threads(),
        }
    )


if __name__ == "__main__":
    main()
