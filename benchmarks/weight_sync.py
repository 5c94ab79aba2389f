"""Weight-sync benchmark: time to push the policy to one and to two rollout actors vs one training step.

SmolLM2-135M on both sides (`model.dtype: auto`: bf16 where the CPU computes it natively, else float32; `--dtype`),
as in a run: a `LearnerGroup` (DeepSpeed ZeRO-2, gradient checkpointing, torch AdamW) and rollout actors
(`create_rollout_actor`) in Ray. The learner trains on
real rollouts of Python stdlib text sampled by the first rollout actor (random features stand in
for the feature network, which the learner's step does not depend on for its cost).

A push is `LearnerGroup.push_weights().confirm()` timed from the driver, as a training step runs it, over
`--transport`: `object_store` (rank 0 puts the weights' bytes once in the object store and every actor loads them
into its in-process engine) or `gloo` (vLLM's weight-transfer protocol, as NCCL runs it on GPUs: engines in their
own EngineCore processes, rank 0 broadcasting packed buffers after every worker entered); either way every actor
reports the new version. Step time is `LearnerGroup.train_step`
timed from the driver. Every push carries a new weight version, so pushes follow steps:

    step 1 (warm-up) -> push to A and B (warm-up)
    step 2 -> push to A (timed: one actor) -> step 3 -> push to A and B (timed: two actors) ...

The default step is deliberately small (1 document x 4 samples, T = 256, C = s = G = 8: 1,248
packed tokens); the paper's step (16 documents x 4 samples, T = 1024) is ~65x more tokens for the
same push, so its ratio is correspondingly lower. The last line is JSON; `ratio` is the two-actor
push time over the median step time.

    python benchmarks/weight_sync.py [--transport object_store|gloo] [--dtype auto|bfloat16|float32]
                                     [--docs-per-step 1] [--chunk-length 256] [--repeats 1] [--learner-cpus 2]
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

C, S, G, N = 8, 8, 8, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs-per-step", type=int, default=1)
    parser.add_argument("--chunk-length", type=int, default=256, help="T; (T - 16) must be a multiple of 8")
    parser.add_argument("--repeats", type=int, default=1, help="timed (one-actor, two-actor) push pairs")
    parser.add_argument("--learner-cpus", type=float, default=2, help="CPUs (torch threads) of the learner rank")
    parser.add_argument("--transport", choices=["object_store", "gloo"], default="object_store")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    args = parser.parse_args()

    from ebft.actors.pool import create_rollout_actor
    from ebft.learner.group import LearnerGroup
    from ebft.model_sources import smollm2_path

    model_path = str(smollm2_path())
    config = build_config(
        {
            "model": {"policy": model_path, "dtype": args.dtype},
            "data": {"chunk_length": args.chunk_length},
            "sampling": {"context_length": C, "stride": S, "block_length": G, "num_samples": N},
            "rollout": {"kv_cache_gib": 0.25, "weight_transport": args.transport},
            "learner": {"zero_stage": 2, "micro_batch_docs": 1, "gradient_checkpointing": True},
            "optim": {"lr": 1e-6, "warmup_fraction": 0.0},
            "training": {"docs_per_step": args.docs_per_step, "steps": 100},
            "resources": {
                "learner": {"num_actors": 1, "cpus_per_actor": args.learner_cpus},
                "rollout": {"num_actors": 2, "cpus_per_actor": 1},
            },
        }
    )
    docs = args.docs_per_step
    ray.init(address="local", num_cpus=int(args.learner_cpus) + 2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        actors = [create_rollout_actor(config, model_path, enforce_eager=True) for _ in range(2)]
        group = LearnerGroup(config, model_path)
        chunks = ChunkBatch(list(range(docs)), stdlib_chunks(model_path, docs, args.chunk_length), step=0)
        ray.get([actor.weight_version.remote() for actor in actors])
        print(f"start-up (learner + 2 engines): {time.perf_counter() - started:.1f} s", flush=True)

        rollouts = ray.get(actors[0].generate.remote(chunks))
        generator = torch.Generator().manual_seed(0)
        dim = 3 * 576
        features = FeatureBatch(
            chunks.chunk_ids,
            torch.randn(docs, config.num_blocks, N, dim, generator=generator),
            torch.randn(docs, config.num_blocks, dim, generator=generator),
        )

        def step() -> float:
            rollouts.weight_version = group.weight_version  # the same rollouts, always fresh
            start = time.perf_counter()
            group.train_step([rollouts], [features], group.weight_version)
            return time.perf_counter() - start

        def push(receivers) -> float:
            """Seconds until every receiver applied the push; records when the push returned to the caller."""
            group.connect_weight_receivers(receivers)
            start = time.perf_counter()
            pushed = group.push_weights()
            returned.append(time.perf_counter() - start)
            version = pushed.confirm()
            elapsed = time.perf_counter() - start
            assert version == group.weight_version and ray.get([a.weight_version.remote() for a in receivers]) == [
                version
            ] * len(receivers)
            return elapsed

        returned: list[float] = []  # what a training step waits for: the rest overlaps generation
        warm_step = step()
        warm_push = push(actors)
        print(f"warm-up: step {warm_step:.2f} s, push to 2 actors {warm_push:.2f} s", flush=True)
        steps, one, two = [], [], []
        for _ in range(args.repeats):
            steps.append(step())
            one.append(push(actors[:1]))
            steps.append(step())
            two.append(push(actors))
            print(
                f"step {steps[-2]:.2f} s, push to 1 actor {one[-1]:.2f} s; "
                f"step {steps[-1]:.2f} s, push to 2 actors {two[-1]:.2f} s",
                flush=True,
            )
        group.shutdown()
        for actor in actors:
            ray.kill(actor)
    finally:
        ray.shutdown()

    step_s = statistics.median(steps)
    sync_one, sync_two = min(one), min(two)
    packed_tokens = docs * (args.chunk_length + N * config.num_blocks * G)  # the document once, then its samples
    print(
        f"SmolLM2-135M {config.model.dtype}, {args.transport}, {docs} doc(s) x {N} samples x T={args.chunk_length} "
        f"({packed_tokens} packed tokens per step)"
    )
    print(f"training step (median of {len(steps)}): {step_s:.2f} s")
    print(f"push to 1 rollout actor: {sync_one:.2f} s  (ratio {sync_one / step_s:.3f})")
    print(f"push to 2 rollout actors: {sync_two:.2f} s  (ratio {sync_two / step_s:.3f})")
    returns_s = min(returned[1:])
    print(f"push returns to the controller after (gather + send): {returns_s:.2f} s")
    emit(
        {
            "benchmark": "weight_sync",
            "ratio": round(sync_two / step_s, 4),
            "ratio_one_actor": round(sync_one / step_s, 4),
            "sync_one_actor_s": round(sync_one, 3),
            "sync_two_actors_s": round(sync_two, 3),
            "step_s": round(step_s, 3),
            "push_returns_s": round(returns_s, 3),
            "ratio_push_returns": round(returns_s / step_s, 4),
            "packed_tokens_per_step": packed_tokens,
            "docs_per_step": docs,
            "chunk_length": args.chunk_length,
            "model": "SmolLM2-135M",
            "dtype": config.model.dtype,
            "transport": args.transport,
            "learner_cpus": args.learner_cpus,
            "goal": "ratio < 0.10",
        }
    )


if __name__ == "__main__":
    main()
