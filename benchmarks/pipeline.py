"""The controller's steady-state step time with stand-in stages of set durations.

Stand-in Ray actors sleep for fixed times (default: generate 3, features 1, train 2 units of
0.25 s). With max_staleness >= 1 the pipeline should approach the slowest stage (generation);
synchronously (max_staleness = 0) a step costs the sum of the stages.
"""

import argparse
import statistics
import time

import ray
import torch
from _timing import emit

from ebft.cluster.controller import Controller
from ebft.cluster.pools import ActorPool
from ebft.config import build_config
from ebft.learner.object_store_sender import ObjectStoreWeightSender
from ebft.learner.weight_sender import WeightPush
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch, WeightUpdate


@ray.remote(num_cpus=0)
class StandInRollout:
    def __init__(self, seconds, n, nb, g):
        self.seconds, self.shape, self.version = seconds, (n, nb, g), 0

    def generate(self, chunks: ChunkBatch) -> RolloutBatch:
        time.sleep(self.seconds)
        docs = len(chunks.chunk_ids)
        tokens = torch.zeros(docs, *self.shape, dtype=torch.long)
        return RolloutBatch(chunks, tokens, torch.zeros(tokens.shape), self.version, elapsed_s=self.seconds)

    def update_weights(self, update: WeightUpdate) -> int:
        self.version = update.version
        return self.version


@ray.remote(num_cpus=0)
class StandInFeatures:
    def __init__(self, seconds):
        self.seconds = seconds

    def extract(self, batch: RolloutBatch) -> FeatureBatch:
        time.sleep(self.seconds)
        docs, n, nb, _ = batch.tokens.shape
        return FeatureBatch(
            batch.chunks.chunk_ids, torch.zeros(docs, nb, n, 4), torch.zeros(docs, nb, 4), elapsed_s=self.seconds
        )


class StandInLearner:
    """Trains by sleeping; pushes through the real object-store sender (an empty update) and WeightPush."""

    def __init__(self, seconds):
        self.seconds, self.version, self.sender = seconds, 0, None

    def train_step(self, rollouts, features, current_version):
        time.sleep(self.seconds)
        self.version += 1
        return {}

    def connect_weight_receivers(self, rollout_actors):
        self.sender = ObjectStoreWeightSender(rollout_actors)

    def push_weights(self) -> WeightPush:
        ids = [actor._actor_id.hex() for actor in self.sender.receivers]
        return WeightPush(self.version, self.sender.send({}, self.version), ids, timeout_s=600)


class CountingStream:
    def __init__(self, T):
        self.T, self.position = T, 0

    def next_batch(self, docs, step):
        ids = list(range(self.position, self.position + docs))
        self.position += docs
        return ChunkBatch(ids, torch.zeros(docs, self.T, dtype=torch.long), step)

    def state_dict(self):
        return {"position": self.position}


def step_time(config, stages, unit, steps):
    generate, featurize, train = (s * unit for s in stages)
    rollout_pool = ActorPool("rollout", lambda i: StandInRollout.remote(generate, 4, config.num_blocks, 8), 1)
    feature_pool = ActorPool("features", lambda i: StandInFeatures.remote(featurize), 1)
    finished = []
    learner = StandInLearner(train)
    learner.connect_weight_receivers(list(rollout_pool))
    controller = Controller(
        config,
        rollout_pool,
        feature_pool,
        learner,
        CountingStream(config.data.chunk_length),
        on_step=lambda result: finished.append(time.perf_counter()),
    )
    controller.run()
    rollout_pool.shutdown()
    feature_pool.shutdown()
    warm = finished[2:]  # skip the pipeline's fill
    return statistics.median(b - a for a, b in zip(warm, warm[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--unit", type=float, default=0.25, help="seconds per time unit")
    parser.add_argument("--stages", type=float, nargs=3, default=[3, 1, 2], metavar=("GEN", "FEAT", "TRAIN"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--staleness", type=int, default=1)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = ["data.chunk_length=64", f"training.steps={args.steps}", "training.docs_per_step=2"]
    asynchronous = step_time(
        build_config(overrides=base + [f"training.max_staleness={args.staleness}"]), args.stages, args.unit, args.steps
    )
    synchronous = step_time(
        build_config(overrides=base + ["training.max_staleness=0"]), args.stages, args.unit, args.steps
    )
    ray.shutdown()
    slowest, total = max(args.stages) * args.unit, sum(args.stages) * args.unit
    print(f"stages (generate, features, train) = {args.stages} x {args.unit} s")
    print(f"synchronous step (max_staleness=0) : {synchronous:.3f} s   (sum of stages {total:.3f} s)")
    print(f"async step (max_staleness={args.staleness})       : {asynchronous:.3f} s   (slowest stage {slowest:.3f} s)")
    print(f"async / slowest = {asynchronous / slowest:.3f}; sync / async = {synchronous / asynchronous:.2f}x")
    emit(
        {
            "benchmark": "pipeline",
            "ratio": round(asynchronous / slowest, 3),
            "async_step_s": round(asynchronous, 3),
            "sync_step_s": round(synchronous, 3),
            "slowest_stage_s": slowest,
            "stage_sum_s": total,
            "speedup_vs_sync": round(synchronous / asynchronous, 2),
            "max_staleness": args.staleness,
        }
    )


if __name__ == "__main__":
    main()
