"""The feature-extractor pool: N Ray actors, each holding one frozen feature network.

The controller spreads the work: it cuts every step's chunks into shards and hands shard i's
rollouts to worker i mod N (ebft/cluster/controller.py), so throughput grows with N.
"""

from __future__ import annotations

import os

import ray

from ebft.config import Config
from ebft.messages import FeatureBatch, RolloutBatch


class FeatureWorker:
    """Ray actor body around `FeatureExtractor`; only pooled features leave it."""

    def __init__(self, model_path: str | os.PathLike, config: Config, log_file: str | None = None):
        from ebft.actor_output import send_output_to
        from ebft.actor_resources import show_only_assigned_gpus

        send_output_to(log_file)
        show_only_assigned_gpus(config.resources.features)
        # Imported here so the driver process never loads the feature model's dependencies for nothing.
        from ebft.features.extractor import FeatureExtractor

        self.extractor = FeatureExtractor(model_path, config)

    def extract(self, batch: RolloutBatch, *, alone: bool = False) -> FeatureBatch:
        """`alone`: nothing else works on this node now (a held-out evaluation): use all its cores."""
        from ebft.cpu_threads import all_cores

        with all_cores(alone and self.extractor.device.type == "cpu"):
            return self.extractor.extract(batch)

    def feature_dim(self) -> int:
        return self.extractor.feature_dim


def create_feature_worker(
    config: Config,
    model_path: str | os.PathLike,
    placement_group=None,
    bundle_index: int = 0,
    log_file: str | None = None,
):
    """One worker requesting `resources.features` GPUs / CPUs, in bundle `bundle_index` of the group if given.

    `model_path` is the feature network's folder: `model.feature_model` if set, else the base policy
    checkpoint (as in the paper). Returns at once; the worker loads its model in the background.
    """
    from ebft.actor_resources import actor_options

    options = actor_options(config.resources.features, placement_group, bundle_index)
    return ray.remote(FeatureWorker).options(**options).remote(str(model_path), config, log_file)
