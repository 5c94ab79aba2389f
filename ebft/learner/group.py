"""The learner pool: world_size Ray actors, each one DeepSpeed rank (engine.LearnerRank).

The group shards a step's documents evenly over the ranks and fans every call out to all of them
(train_step, push_weights, save_checkpoint and load_checkpoint are collective). Checkpoint paths
must be on storage every rank can reach (one node, or a shared filesystem).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from ebft.actor_failures import UnresponsiveActorError, is_actor_failure
from ebft.actor_resources import actor_options
from ebft.config import BROADCAST_TRANSPORTS, Config
from ebft.learner.weight_sender import WeightPush, make_weight_sender
from ebft.messages import ChunkBatch, CompletionBatch, FeatureBatch, RewardBatch, RolloutBatch

if TYPE_CHECKING:
    import torch


ANSWER_MARGIN_S = 60.0
"""What a bound on the learner adds to the transfer's own bounds (Ray's calls, a slow first CUDA call)."""


class LearnerRankActor:
    """Ray actor body: one process, one rank, built once the rendezvous address is known."""

    def __init__(self, log_file: str | None = None):
        from ebft.actor_output import send_output_to

        send_output_to(log_file)
        self.learner = None
        self.weight_sender = None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self) -> tuple[str, int]:
        from ebft.learner.deepspeed_setup import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(
        self,
        config: Config,
        model_path: str,
        *,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        ranks_on_node: int,
    ) -> None:
        """`ranks_on_node`: learner ranks sharing this node's cores (cpu_threads.actor_threads)."""
        from ebft.actor_resources import show_only_assigned_gpus
        from ebft.cpu_threads import actor_threads, set_threads
        from ebft.learner.engine import LearnerRank

        resources = config.resources.learner
        show_only_assigned_gpus(resources)
        trains_alone = config.training.max_staleness == 0
        set_threads(actor_threads(resources, trains_alone=trains_alone, ranks_on_node=ranks_on_node))
        self.learner = LearnerRank(
            config,
            model_path,
            rank=rank,
            world_size=world_size,
            master_addr=master_addr,
            master_port=master_port,
        )

    def train_step(self, rollouts, features, current_version: int) -> dict[str, float]:
        return self.learner.train_step(rollouts, features, current_version)

    def rlvr_step(self, completions, rewards, current_version: int) -> dict[str, float]:
        return self.learner.rlvr_step(completions, rewards, current_version)

    def sft_step(self, chunks, current_version: int) -> dict[str, float]:
        return self.learner.sft_step(chunks, current_version)

    def connect_weight_receivers(self, rollout_actors, learner: int) -> None:
        """Rank 0: open the run's weight transport to these rollout actors (again after one was replaced).
        `learner`: the group's incarnation, which its pushes carry."""
        if self.learner.rank != 0:
            return
        if self.weight_sender is not None:
            self.weight_sender.close()
            self.weight_sender = None
        options = {}
        if self.broadcasts:
            from ebft.learner.deepspeed_setup import free_port

            address, device = ray.util.get_node_ip_address(), self.learner.device
            options = {"master_address": address, "master_port": free_port(), "device": device}
        sender = make_weight_sender(self.learner.config, rollout_actors, learner, **options)
        sender.connect()
        self.weight_sender = sender

    @property
    def broadcasts(self) -> bool:
        return self.learner.config.weight_transport in BROADCAST_TRANSPORTS

    def push_weights(self) -> tuple[int, list] | None:
        """Start sending the current weights (all ranks: ZeRO-3 gathers them one module at a time); rank 0 returns
        (version, one acknowledgment per rollout actor). A broadcast sends from the learner's device."""
        if self.learner.rank == 0 and self.weight_sender is None:
            raise RuntimeError("call connect_weight_receivers(rollout_actors) before push_weights()")
        stream = self.learner.stream_weights(self.learner.device if self.broadcasts else "cpu")
        try:
            if self.learner.rank != 0:
                return None
            version = self.learner.weight_version
            return version, self.weight_sender.send(stream, version)
        finally:
            # Every rank runs each ZeRO-3 gather to the end: the other ranks' part, and the rest of the model after a
            # send that failed part way (a whole send has exhausted the stream already).
            for _ in stream.tensors:
                pass

    def document_ce(self, tokens):
        return self.learner.document_ce(tokens)

    def save_checkpoint(self, path: str, extra_state: dict[str, Any]) -> str:
        return str(self.learner.save_checkpoint(path, extra_state))

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        return self.learner.load_checkpoint(path)

    def state(self) -> dict[str, int]:
        return {"step": self.learner.step, "weight_version": self.learner.weight_version}


class LearnerGroup:
    """resources.learner.num_actors DeepSpeed ranks as Ray actors (one placement-group bundle each, if given)."""

    def __init__(
        self,
        config: Config,
        model_path: str | os.PathLike,
        placement_group=None,
        *,
        bundle_indices: Sequence[int] | None = None,
        log_dir: str | os.PathLike | None = None,
    ):
        """`log_dir`: each rank's output goes to `learner-<rank>.log` there (None: where Ray sends it)."""
        resources = config.resources.learner
        self.config = config
        self.world_size = resources.num_actors
        bundles = list(bundle_indices) if bundle_indices is not None else list(range(self.world_size))
        remote_cls = ray.remote(LearnerRankActor)
        self.actors = []
        for rank in range(self.world_size):
            options = actor_options(resources, placement_group, bundles[rank])
            log_file = None if log_dir is None else str(Path(log_dir) / f"learner-{rank}.log")
            self.actors.append(remote_cls.options(**options).remote(log_file))
        try:
            master_addr, master_port = ray.get(self.actors[0].rendezvous_address.remote())
            nodes = ray.get([actor.node_id.remote() for actor in self.actors])
            self.ranks_on_node = [nodes.count(node) for node in nodes]
            ray.get(
                [
                    actor.setup.remote(
                        config,
                        str(model_path),
                        rank=rank,
                        world_size=self.world_size,
                        master_addr=master_addr,
                        master_port=master_port,
                        ranks_on_node=self.ranks_on_node[rank],
                    )
                    for rank, actor in enumerate(self.actors)
                ]
            )
        except Exception:
            self.shutdown()
            raise
        self.weight_version = 0
        self.rollout_actors: list[Any] = []
        # Larger for a group started later (a restart): its pushes may go back from an earlier group's versions.
        self.incarnation = time.time_ns()

    def train_step(
        self,
        rollouts: list[RolloutBatch],
        features: list[FeatureBatch],
        current_version: int,
    ) -> dict[str, float]:
        """One optimizer step over all of the step's documents; metrics are already averaged over ranks."""
        from ebft.learner.batches import shard_batches

        shards = shard_batches(rollouts, features, self.world_size)
        metrics = gather(
            [actor.train_step.remote(r, f, current_version) for actor, (r, f) in zip(self.actors, shards)]
        )[0]
        self.weight_version = int(metrics["train/weight_version"])
        return metrics

    def sft_step(self, chunks: list[ChunkBatch], current_version: int) -> dict[str, float]:
        """One cross-entropy step over the step's chunks (training.method = sft), split evenly over the ranks."""
        docs = [(c, i) for c in chunks for i in range(len(c.chunk_ids))]
        if len(docs) % self.world_size:
            raise ValueError(f"{len(docs)} documents cannot be split evenly over {self.world_size} learner ranks")
        per_rank = len(docs) // self.world_size
        shards = [
            [
                ChunkBatch([c.chunk_ids[i]], c.tokens[i : i + 1], c.step)
                for c, i in docs[r * per_rank : (r + 1) * per_rank]
            ]
            for r in range(self.world_size)
        ]
        metrics = gather([actor.sft_step.remote(s, current_version) for actor, s in zip(self.actors, shards)])[0]
        self.weight_version = int(metrics["train/weight_version"])
        return metrics

    def rlvr_step(
        self, completions: list[CompletionBatch], rewards: list[RewardBatch], current_version: int
    ) -> dict[str, float]:
        """One RLVR step over the step's questions (training.method = rlvr), split evenly over the ranks."""
        questions = sum(len(batch.tokens) for batch in completions)
        if questions % self.world_size:
            raise ValueError(f"{questions} questions cannot be split evenly over {self.world_size} learner ranks")
        per_rank, shards, start = questions // self.world_size, [], 0
        for _ in range(self.world_size):
            shards.append(cut(list(zip(completions, rewards)), start, start + per_rank))
            start += per_rank
        calls = [
            actor.rlvr_step.remote([c for c, _ in shard], [r for _, r in shard], current_version)
            for actor, shard in zip(self.actors, shards)
        ]
        metrics = gather(calls)[0]
        self.weight_version = int(metrics["train/weight_version"])
        return metrics

    def connect_weight_receivers(self, rollout_actors: Sequence[Any]) -> None:
        """Open the configured weight transport from rank 0 to these rollout actors (once, or after a restart)."""
        self.rollout_actors = list(rollout_actors)
        # Rank 0's connect is bounded (2 x the bound for the receivers to answer, 1 x to join): past that it is hung.
        bound = 3 * self.config.rollout.weight_sync_timeout_s + ANSWER_MARGIN_S
        calls = [actor.connect_weight_receivers.remote(self.rollout_actors, self.incarnation) for actor in self.actors]
        self.gather(calls, bound, "connect to the rollout actors")

    def push_weights(self) -> WeightPush:
        """Send the current weights to the connected rollout actors; returns once they are on their way
        (`.confirm()` waits until every actor applied them)."""
        # Rank 0's push has one deadline, weight_sync_timeout_s; gathering the weights under ZeRO-3 adds to it.
        bound = 2 * self.config.rollout.weight_sync_timeout_s + ANSWER_MARGIN_S
        version, acknowledgments = self.gather([actor.push_weights.remote() for actor in self.actors], bound, "push")[0]
        actor_ids = [actor._actor_id.hex() for actor in self.rollout_actors]
        return WeightPush(version, acknowledgments, actor_ids, self.config.rollout.weight_sync_timeout_s)

    def document_ce(self, tokens) -> torch.Tensor:
        """Teacher-forced token-mean NLL [docs] of chunks [docs, T] under the current policy."""
        return gather([actor.document_ce.remote(tokens) for actor in self.actors])[0]

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict[str, Any] | None = None) -> str:
        return gather([actor.save_checkpoint.remote(str(path), extra_state or {}) for actor in self.actors])[0]

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        extra = gather([actor.load_checkpoint.remote(str(path)) for actor in self.actors])[0]
        state = ray.get(self.actors[0].state.remote())
        self.weight_version = state["weight_version"]
        return extra

    def gather(self, refs: list, bound_s: float, what: str) -> list:
        """`gather` within a bound: a rank that has not answered by then is hung (in a collective no one can end from
        outside), so the group is ended and the controller restarts it."""
        try:
            return gather(refs, bound_s)
        except ray.exceptions.GetTimeoutError:
            actor_id = self.actors[0]._actor_id.hex()
            self.shutdown()
            raise UnresponsiveActorError(actor_id, f"the learner did not {what} within {bound_s:g} s") from None

    def alive(self) -> bool:
        """False if any rank's process is gone."""
        try:
            ray.get([actor.node_id.remote() for actor in self.actors])
            return True
        except Exception as error:
            if not is_actor_failure(error):
                raise
            return False

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> LearnerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def cut(pairs: list[tuple[CompletionBatch, RewardBatch]], start: int, stop: int) -> list:
    """The questions start..stop of consecutive (completions, rewards) batches, as parts of them."""
    parts, offset = [], 0
    for completions, rewards in pairs:
        size = len(completions.tokens)
        a, b = max(start - offset, 0), min(stop - offset, size)
        if a < b:
            parts.append((completions.part(a, b), rewards.part(a, b)))
        offset += size
    return parts


def gather(refs: list, bound_s: float | None = None) -> list:
    """ray.get of every rank's result, raising as soon as one rank fails: the others may be waiting for it
    in a collective that never completes. Past `bound_s`, GetTimeoutError."""
    pending = list(refs)
    deadline = None if bound_s is None else time.monotonic() + bound_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} of {len(refs)} ranks did not answer")
        ray.get(done)
    return ray.get(refs)
