"""Weight-sync benchmark: time to push the policy to one and to two rollout actors vs one training step.

The step is the one `make demo` trains on this machine: configs/quickstart.yaml as `ebft demo` sizes it
(ebft/demo.py: 2 documents x 4 samples, T = 128 where the CPU computes bf16 natively, else float32 and T = 64;
C = s = G = 8; DeepSpeed ZeRO-2 without gradient checkpointing; one learner rank on 0.5 CPU, so one thread), with
a second rollout actor. SmolLM2-135M on both sides: a `LearnerGroup` and rollout actors (`create_rollout_actor`)
in Ray. The learner trains on real rollouts of Python stdlib text sampled by the first rollout actor (random
features stand in for the feature network, which the learner's step does not depend on for its cost).

A push is `LearnerGroup.push_weights().confirm()` timed from the driver, as a training step runs it, over
`--transport`: `object_store` (rank 0 puts the weights' bytes once in the object store and every actor loads them
into its in-process engine) or `gloo` (vLLM's weight-transfer protocol, as NCCL runs it on GPUs: engines in their
own EngineCore processes, rank 0 broadcasting packed buffers after every worker entered); either way every actor
reports the new version. Step time is `LearnerGroup.train_step` timed from the driver. Every push carries a new
weight version, so pushes follow steps:

    step 1 (warm-up) -> push to A and B (warm-up)
    step 2 -> push to A (timed: one actor) -> step 3 -> push to A and B (timed: two actors) ...

Steps and pushes are timed the same way: after that warm-up, the median of the timed ones (`--repeats` pairs).
The paper's step (16 documents x 4 samples, T = 1024) has ~67x the tokens of the demo's at T = 128 for the same
push, so its ratio is correspondingly lower. The last line is JSON; `ratio` is the two-actor push time over the
step time.

    python benchmarks/weight_sync.py [--transport object_store|gloo] [--dtype auto|bfloat16|float32]
                                     [--repeats 3] [KEY=VALUE ...]   # overrides of the demo's config
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit, quiet_environment, stdlib_chunks  # noqa: E402

quiet_environment()

import ray
import torch

from ebft.messages import ChunkBatch, FeatureBatch  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed (one-actor, two-actor) push pairs")
    parser.add_argument("--transport", choices=["object_store", "gloo"], default="object_store")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the demo's config, e.g. data.chunk_length=64")
    args = parser.parse_args()

    from ebft.actors.pool import create_rollout_actor
    from ebft.demo import demo_config
    from ebft.learner.group import LearnerGroup
    from ebft.model_sources import smollm2_path

    model_path = str(smollm2_path())
    settings = [
        f"model.policy={model_path}",
        f"model.dtype={args.dtype}",
        "resources.rollout.num_actors=2",
        f"rollout.weight_transport={args.transport}",
    ]
    config, _ = demo_config(str(QUICKSTART), [*settings, *args.overrides])
    sampling, docs, length = config.sampling, config.training.docs_per_step, config.data.chunk_length
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        actors = [create_rollout_actor(config, model_path, enforce_eager=True) for _ in range(2)]
        group = LearnerGroup(config, model_path)
        chunks = ChunkBatch(list(range(docs)), stdlib_chunks(model_path, docs, length), step=0)
        ray.get([actor.weight_version.remote() for actor in actors])
        print(f"start-up (learner + 2 engines): {time.perf_counter() - started:.1f} s", flush=True)

        rollouts = ray.get(actors[0].generate.remote(chunks))
        generator = torch.Generator().manual_seed(0)
        dim = 3 * 576
        features = FeatureBatch(
            chunks.chunk_ids,
            torch.randn(docs, config.num_blocks, sampling.num_samples, dim, generator=generator),
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

    step_s, sync_one, sync_two = (statistics.median(times) for times in (steps, one, two))
    # the document once, then its samples
    packed_tokens = docs * (length + sampling.num_samples * config.num_blocks * sampling.block_length)
    print(
        f"SmolLM2-135M {config.model.dtype}, {args.transport}, the demo's step: {docs} doc(s) x "
        f"{sampling.num_samples} samples x T={length} ({packed_tokens} packed tokens), "
        f"{config.resources.learner.cpus_per_actor:g} CPU learner rank; medians after a warm-up"
    )
    print(f"training step (median of {len(steps)}): {step_s:.2f} s")
    print(f"push to 1 rollout actor (median of {len(one)}): {sync_one:.2f} s  (ratio {sync_one / step_s:.3f})")
    print(f"push to 2 rollout actors (median of {len(two)}): {sync_two:.2f} s  (ratio {sync_two / step_s:.3f})")
    returns_s = statistics.median(returned[1:])
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
            "chunk_length": length,
            "model": "SmolLM2-135M",
            "dtype": config.model.dtype,
            "transport": args.transport,
            "learner_cpus": config.resources.learner.cpus_per_actor,
            "gradient_checkpointing": config.learner.gradient_checkpointing,
            "statistic": "median after a warm-up",
            "goal": "ratio < 0.10",
        }
    )


if __name__ == "__main__":
    main()
