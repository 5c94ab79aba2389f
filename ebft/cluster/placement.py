"""One placement group per pool, so rollout, feature, learner (and verifier) resources scale independently."""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group

from ebft.config import Config, ConfigError, PoolResources

POOLS = ("rollout", "features", "learner")


def run_pools(config: Config) -> tuple[str, ...]:
    """The pools a run starts: RLVR runs score their completions in a verifier pool too."""
    return (*POOLS, "verifiers") if config.training.method == "rlvr" else POOLS


def pool_bundles(resources: PoolResources) -> list[dict[str, float]]:
    bundle = {"CPU": resources.cpus_per_actor, **resources.node_resources}
    if resources.gpus_per_actor:
        bundle["GPU"] = resources.gpus_per_actor
    return [dict(bundle) for _ in range(resources.num_actors)]


def check_fits(config: Config) -> None:
    """Fail before any actor starts if the pools cannot fit the cluster's resources."""
    available = ray.cluster_resources()
    bundles = {pool: pool_bundles(getattr(config.resources, pool)) for pool in run_pools(config)}
    for kind in sorted({kind for pool in bundles.values() for bundle in pool for kind in bundle}):
        needed = sum(bundle.get(kind, 0.0) for pool in bundles.values() for bundle in pool)
        have = available.get(kind, 0.0)
        if needed > have + 1e-9:
            sizes = ", ".join(f"{pool}: {len(b)} x {b[0]}" for pool, b in bundles.items())
            raise ConfigError(
                f"the pools need {needed:g} {kind} but the Ray cluster has {have:g} ({sizes}); lower "
                f"resources.<pool>.num_actors / cpus_per_actor / gpus_per_actor / node_resources or add nodes"
            )


def create_placement_groups(config: Config, timeout_s: float = 120.0) -> dict[str, PlacementGroup]:
    """{pool: placement group} with one bundle per actor; actors of a pool are packed together."""
    check_fits(config)
    groups = {
        pool: placement_group(pool_bundles(getattr(config.resources, pool)), strategy="PACK", name=f"ebft-{pool}")
        for pool in run_pools(config)
    }
    ready, _ = ray.wait([g.ready() for g in groups.values()], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        raise RuntimeError(f"placement groups were not ready within {timeout_s:.0f} s; is the cluster big enough?")
    return groups
