"""The feature-extractor pool: N Ray actors, each holding one frozen feature network.

A rollout batch is split by documents into contiguous shards, one per worker (least-loaded workers
first), and the shards' feature batches are put back together in the batch's document order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ebft.config import Config
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch


class FeatureWorker:
    """Ray actor body around `FeatureExtractor`; only pooled features leave it."""

    def __init__(self, model_path: str | os.PathLike, config: Config):
        # Imported here so the driver process never loads the feature model's dependencies for nothing.
        from ebft.features.extractor import FeatureExtractor

        self.extractor = FeatureExtractor(model_path, config)

    def extract(self, batch: RolloutBatch) -> FeatureBatch:
        return self.extractor.extract(batch)

    def feature_dim(self) -> int:
        return self.extractor.feature_dim


def create_feature_worker(config: Config, model_path: str | os.PathLike, placement_group=None, bundle_index: int = 0):
    """One worker requesting `resources.features` GPUs / CPUs, in bundle `bundle_index` of the group if given.

    `model_path` is the feature network's folder: `model.feature_model` if set, else the base policy
    checkpoint (as in the paper). Returns at once; the worker loads its model in the background.
    """
    resources = config.resources.features
    options: dict = {"num_cpus": resources.cpus_per_actor, "num_gpus": resources.gpus_per_actor}
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle_index
        )
    return ray.remote(FeatureWorker).options(**options).remote(str(model_path), config)


def create_feature_workers(config: Config, model_path: str | os.PathLike, placement_group=None, bundle_offset: int = 0) -> list:
    """`resources.features.num_actors` workers; worker i in bundle `bundle_offset + i`."""
    return [
        create_feature_worker(config, model_path, placement_group, bundle_offset + index)
        for index in range(config.resources.features.num_actors)
    ]


def slice_rollout_batch(batch: RolloutBatch, start: int, stop: int) -> RolloutBatch:
    """Documents start..stop-1 of a rollout batch."""
    chunks = batch.chunks
    return RolloutBatch(
        chunks=ChunkBatch(chunk_ids=list(chunks.chunk_ids[start:stop]), tokens=chunks.tokens[start:stop], step=chunks.step),
        tokens=batch.tokens[start:stop],
        behavior_logprobs=batch.behavior_logprobs[start:stop],
        weight_version=batch.weight_version,
        elapsed_s=batch.elapsed_s,
    )


def concatenate_feature_batches(parts: list[FeatureBatch]) -> FeatureBatch:
    """Shards in order; `elapsed_s` is the slowest shard's (the shards run in parallel on different workers)."""
    return FeatureBatch(
        chunk_ids=[chunk_id for part in parts for chunk_id in part.chunk_ids],
        rollout_features=torch.cat([part.rollout_features for part in parts]),
        gt_features=torch.cat([part.gt_features for part in parts]),
        elapsed_s=max(part.elapsed_s for part in parts),
    )


@dataclass
class PendingFeatures:
    """Features of one submitted rollout batch, still being computed (`refs` works with `ray.wait`)."""

    refs: list[ray.ObjectRef]

    def result(self, timeout: float | None = None) -> FeatureBatch:
        return concatenate_feature_batches(ray.get(self.refs, timeout=timeout))


class FeaturePool:
    """Spreads rollout batches over feature workers by documents; results come back in document order."""

    def __init__(self, workers: list[ray.actor.ActorHandle]):
        if not workers:
            raise ValueError("a feature pool needs at least one worker (resources.features.num_actors >= 1)")
        self.workers = list(workers)
        self._in_flight: list[tuple[int, ray.ObjectRef, int]] = []  # (worker index, result ref, documents)

    def __len__(self) -> int:
        return len(self.workers)

    def wait_ready(self, timeout: float | None = None) -> int:
        """Block until every worker has loaded its model; returns the feature dimension D."""
        dims = set(ray.get([worker.feature_dim.remote() for worker in self.workers], timeout=timeout))
        if len(dims) != 1:
            raise RuntimeError(f"feature workers disagree on the feature dimension: {sorted(dims)}")
        return dims.pop()

    def documents_in_flight(self) -> list[int]:
        """Documents submitted to each worker whose features are not computed yet."""
        if self._in_flight:
            refs = [ref for _, ref, _ in self._in_flight]
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            pending = set(pending)
            self._in_flight = [entry for entry in self._in_flight if entry[1] in pending]
        load = [0] * len(self.workers)
        for worker_index, _, documents in self._in_flight:
            load[worker_index] += documents
        return load

    def submit(self, batch: RolloutBatch) -> PendingFeatures:
        """Start extracting features of `batch`; does not block."""
        num_docs = batch.tokens.shape[0]
        if num_docs == 0:
            raise ValueError("the rollout batch holds no documents")
        load = self.documents_in_flight()
        shards = min(len(self.workers), num_docs)
        least_loaded = sorted(range(len(self.workers)), key=lambda index: (load[index], index))[:shards]
        refs, start = [], 0
        for shard, worker_index in enumerate(least_loaded):
            stop = start + num_docs // shards + (1 if shard < num_docs % shards else 0)
            ref = self.workers[worker_index].extract.remote(slice_rollout_batch(batch, start, stop))
            self._in_flight.append((worker_index, ref, stop - start))
            refs.append(ref)
            start = stop
        return PendingFeatures(refs)

    def extract(self, batch: RolloutBatch) -> FeatureBatch:
        return self.submit(batch).result()
