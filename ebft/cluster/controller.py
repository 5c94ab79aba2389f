"""The EBFT controller: the training loop, reading as the algorithm.

    evaluate the starting weights                                       (held-out evaluation)
    for every step:
        take the step's document chunks
        sample n rollouts of G tokens at every block of every chunk     (rollout actors, vLLM)
        embed the rollouts and the ground truth                         (feature workers)
        advantages, loss and one optimizer step                         (learner)
        push the new weights to the rollout actors                      (weight transport)
        every eval.every steps: evaluate; every checkpoint.every steps: save
    evaluate and save the final weights

training.machine_budget_s ends the run early, like a last step, once its pools were busy that long.

A learner rank that dies sends the run back to its last checkpoint (or its start): a new learner group
loads it, the rollout actors get its weights, everything sampled after it is dropped and its steps are
trained again, up to training.max_restarts times.

A training method is the stages a step's shards go through (`STAGES`): with training.method = rlvr the
rollout actors sample n completions of each question, the verifier pool scores them, and the learner takes
a REINFORCE step. With training.method = sft the same loop trains cross-entropy on the same chunks: nothing
is sampled or scored, and weights reach the rollout actors only when an evaluation needs them.

With training.max_staleness = k, the rollouts of steps t+1..t+k are generated while step t trains
(at most k + 1 steps in flight), each step's from the weights last pushed when it is scheduled, so a run
repeats exactly; k = 0 is synchronous on-policy EBFT. Each step's chunks are cut
into shards; a shard is generated whole by one rollout actor with one weight version and embedded
by one feature worker, so shards pipeline through the pools without the controller in between.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from ebft.actor_failures import UnresponsiveActorError, failed_actor_ids, is_actor_failure
from ebft.cluster.cost import step_cost
from ebft.cluster.pools import ActorPool
from ebft.config import Config
from ebft.messages import ChunkBatch, PromptBatch

log = logging.getLogger(__name__)

READ_ERROR_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Stages:
    """A training method's step through the pools: the rollout actors' call on a shard's batch, the scoring
    pool's call on what they generated, and the learner's step over both (names of their methods)."""

    generate: str
    score: str
    train: str
    scoring_pool: str  # "features" or "verifiers"


STAGES = {
    "ebft": Stages("generate", "extract", "train_step", "features"),  # RolloutBatch -> FeatureBatch
    "rlvr": Stages("complete_prompts", "score", "rlvr_step", "verifiers"),  # CompletionBatch -> RewardBatch
}


@dataclass
class Shard:
    chunks: ChunkBatch | PromptBatch
    rollout_actor: int
    scorer: int
    rollout: ray.ObjectRef | None = None
    scores: ray.ObjectRef | None = None
    rollout_handle: Any = None  # the actors the refs were submitted to: a failure replaces only these
    scorer_handle: Any = None


@dataclass
class ScheduledStep:
    step: int
    chunks: ChunkBatch | PromptBatch
    shards: list[Shard]
    resume_state: dict[str, Any]
    """The data stream's state right after this step's chunks were drawn: where a run resumes once it trained."""


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float]
    rollouts: list  # RolloutBatch (ebft) or CompletionBatch (rlvr), one per shard
    features: list  # FeatureBatch (ebft) or RewardBatch (rlvr)


@dataclass
class RestorePoint:
    """Where a restarted learner goes back to: a checkpoint (None: the base weights) and the run's state there."""

    step: int
    version: int
    data_state: dict[str, Any]
    checkpoint: Path | None


@dataclass
class Controller:
    config: Config
    rollout_pool: ActorPool
    feature_pool: ActorPool
    learner: Any  # LearnerGroup: train_step / sft_step / push_weights
    stream: Any  # ChunkStream: next_batch / state_dict
    step: int = 0
    version: int = 0
    on_step: Callable[[StepResult], None] = lambda result: None
    evaluate: Callable[[int], None] | None = None
    """Held-out evaluation of the current weights at a step (None: never)."""
    save: Callable[[int, dict[str, Any]], Path] | None = None
    """Checkpoint of the current weights with the data position after that step (None: never); returns its path."""
    restart_learner: Callable[[RestorePoint], Any] | None = None
    """A new learner group at a restore point, not connected to the rollout actors (None: a dead learner rank ends
    the run)."""
    checkpoint: Path | None = None
    """The checkpoint this run resumed from, if any."""
    trained: dict[int, list[int]] = field(default_factory=dict)
    """{step: the chunk ids it trained}."""
    restarts: int = 0
    learner_restarts: int = 0
    restore_point: RestorePoint | None = None
    """The last checkpoint saved (or the run's start): where a learner restart goes back to."""
    stop_requested: bool = False
    """Set (e.g. on Ctrl-C) to stop once the step being trained is finished."""
    resume_state: dict[str, Any] | None = None
    """The data position after the last trained step: what a checkpoint saves."""
    machine_s: float = 0.0
    """Device-seconds the pools spent on training steps so far (ebft.cluster.cost), a resumed run's included."""
    verifier_pool: ActorPool | None = None
    """training.method = rlvr: the pool scoring the completions."""
    _push: Any = None
    """The last weight push (a learner.weight_sender.WeightPush), confirmed before the next one."""
    _engine_version: int = 0
    """The weight version last pushed to the rollout actors."""

    def run(self) -> None:
        last = self.config.training.steps
        if self.resume_state is None:
            self.resume_state = self.stream.state_dict()
        self.restore_point = RestorePoint(self.step, self.version, self.resume_state, self.checkpoint)
        if self.step == 0 and self.config.eval.at_start:
            self.evaluate_now()
        in_flight: deque[ScheduledStep] = deque()
        next_step = self.step
        while self.step < last and not self.stop_requested and not self.budget_spent:
            try:
                if self.stages:
                    self.sync_weights()  # resumed: the engines start from the base weights
                    # The push and the next generation reach an actor from two processes: the generation is sent
                    # once the push is applied, so which weights sample a step never depends on which came first.
                    self.confirm_push()
                while len(in_flight) <= self.config.training.max_staleness and next_step < last:
                    in_flight.append(self.schedule(next_step))  # generation starts now, features follow
                    next_step += 1
                self.train(in_flight.popleft(), last)
            except Exception as error:
                if not self.learner_died(error):
                    raise
                self.restore(error)
                in_flight.clear()  # sampled after the restore point
                next_step = self.step

    def train(self, work: ScheduledStep, last: int) -> None:
        timings: dict[str, float] = {}
        with timed(timings, "waiting"):
            rollouts, features = self.collect(work)
        with timed(timings, "train"):
            if self.stages:
                metrics = getattr(self.learner, self.stages.train)(rollouts, features, self.version)
            else:
                metrics = self.learner.sft_step([work.chunks], self.version)
        self.version += 1
        with timed(timings, "weight_sync"):
            if self.stages:
                self.sync_weights()
        self.finish_step(work, rollouts, features, metrics, timings)
        finished = self.step == last or self.budget_spent
        if finished or self.due(self.config.eval.every):
            self.evaluate_now()
        if finished or self.due(self.config.checkpoint.every) or self.stop_requested:
            self.save_now()

    def finish_step(self, work, rollouts, features, metrics, timings) -> None:
        metrics.update({f"timing/{phase}": seconds for phase, seconds in timings.items()})
        if self.stages:
            metrics["timing/generate"] = sum(r.elapsed_s for r in rollouts)
            metrics[f"timing/{self.stages.scoring_pool}"] = sum(f.elapsed_s for f in features)
            metrics["train/staleness_max"] = max(self.version - 1 - r.weight_version for r in rollouts)
        if self.config.training.method == "rlvr":
            for rewards in features:
                for outcome, count in rewards.outcomes.items():
                    metrics[f"verify/{outcome}"] = metrics.get(f"verify/{outcome}", 0) + count
        metrics.update(step_cost(self.config, metrics, ranks_on_node=self.learner.ranks_on_node))
        self.machine_s += metrics["cost/machine_s"]
        self.trained[work.step] = list(work.chunks.ids)
        self.step += 1
        self.resume_state = work.resume_state
        self.on_step(StepResult(work.step, metrics, rollouts, features))

    @property
    def budget_spent(self) -> bool:
        budget = self.config.training.machine_budget_s
        return budget is not None and self.machine_s >= budget

    def due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def evaluate_now(self) -> None:
        if self.evaluate is None:
            return
        for attempt in range(2):
            self.sync_weights()
            self.confirm_push()  # the evaluation's generations must see these weights
            try:
                self.evaluate(self.step)
                return
            except Exception as error:
                if attempt == 0 and self.replace_failed_actor(error):
                    continue  # evaluated again from the start, on the replacement
                if self.restore_point.step != self.step and self.learner.alive():
                    log.error("the evaluation at step %d failed; saving the weights trained so far first", self.step)
                    self.save_now()
                raise

    def save_now(self) -> None:
        if self.save is not None:
            path = self.save(self.step, self.resume_state)
            self.restore_point = RestorePoint(self.step, self.version, self.resume_state, path)

    @property
    def trained_chunk_ids(self) -> list[int]:
        return [chunk for step in sorted(self.trained) for chunk in self.trained[step]]

    # ------------------------------------------------------------------ learner restarts

    def learner_died(self, error: Exception) -> bool:
        """A learner rank died and the run restarts it; never during a requested stop, whose signal may have reached
        the pools too (the run ends naming its last checkpoint, ebft.cluster.train.run)."""
        if self.stop_requested:
            return False
        return self.restart_learner is not None and is_actor_failure(error) and not self.learner.alive()

    def restore(self, error: Exception) -> None:
        """Start a new learner group at the restore point and rewind the run to it."""
        point, limit = self.restore_point, self.config.training.max_restarts
        where = f"checkpoint {point.checkpoint}" if point.checkpoint else "the base weights"
        if self.learner_restarts >= limit:
            resume = f"`--resume` continues from {point.checkpoint}" if point.checkpoint else "no checkpoint was saved"
            raise RuntimeError(
                f"a learner rank died and the run has used its {limit} restarts (training.max_restarts); {resume}"
            ) from error
        self.learner_restarts += 1
        self.restarts += 1
        log.warning(
            "a learner rank died (%s); restart %d of %d from %s at step %d",
            type(error).__name__,
            self.learner_restarts,
            limit,
            where,
            point.step,
        )
        self.learner = self.restart_learner(point)
        self.step, self.version, self.resume_state = point.step, point.version, point.data_state
        self.stream.load_state_dict(point.data_state)
        self.trained = {step: ids for step, ids in self.trained.items() if step < point.step}
        self._push = None  # from the dead learner
        # Engines left inside its push end themselves (their transfer group's store went with it): the connect
        # below finds them dead and replaces them. The restored weights may be an older version than the engines
        # hold: a new learner group's pushes may go back (rollout.RolloutWorker.check_forward).
        self._engine_version = -1  # the restored weights go out before anything is sampled
        self.connect_rollout_actors()

    # ------------------------------------------------------------------ stages

    def schedule(self, step: int) -> ScheduledStep:
        chunks = self.stream.next_batch(self.config.training.docs_per_step, step=step)
        if not self.stages:
            return ScheduledStep(step, chunks, [], self.stream.state_dict())
        scorers = len(self.scoring_pool)
        shards = [
            Shard(part, rollout_actor=i % len(self.rollout_pool), scorer=i % scorers)
            for i, part in enumerate(split_batch(chunks, max(len(self.rollout_pool), scorers)))
        ]
        for shard in shards:
            self.generate(shard)
        return ScheduledStep(step, chunks, shards, self.stream.state_dict())

    def generate(self, shard: Shard) -> None:
        shard.rollout_handle = self.rollout_pool[shard.rollout_actor]
        shard.rollout = getattr(shard.rollout_handle, self.stages.generate).remote(shard.chunks)
        self.score(shard)

    def score(self, shard: Shard) -> None:
        # Passing the ObjectRef lets Ray start the scoring as soon as the rollouts exist.
        shard.scorer_handle = self.scoring_pool[shard.scorer]
        shard.scores = getattr(shard.scorer_handle, self.stages.score).remote(shard.rollout)

    def collect(self, work: ScheduledStep) -> tuple[list, list]:
        """Wait for a step's rollouts and their scores (features, rewards); work lost with a dead actor is redone."""
        rollouts, features = [], []
        for shard in work.shards:
            while True:
                try:
                    rollout = self.rollout_of(shard)
                except Exception as error:
                    if not is_actor_failure(error):
                        raise
                    self.replace_rollout_actors({shard.rollout_actor: shard.rollout_handle}, error)
                    read_error(shard.scores)  # never ran: its rollout was lost with the actor
                    self.generate(shard)
                    continue
                if self.version - rollout.weight_version > self.config.training.max_staleness:
                    self.generate(shard)  # never train rollouts older than max_staleness versions
                    continue
                try:
                    feature = ray.get(shard.scores)
                except Exception as error:
                    if not is_actor_failure(error):
                        raise
                    self.replace_actor(self.scoring_pool, shard.scorer, shard.scorer_handle, error)
                    self.score(shard)
                    continue
                rollouts.append(rollout)
                features.append(feature)
                break
        return rollouts, features

    def rollout_of(self, shard: Shard):
        """A shard's rollouts; an actor that has not returned them within rollout.generate_timeout_s is unresponsive."""
        bound = self.config.rollout.generate_timeout_s
        try:
            return ray.get(shard.rollout, timeout=bound)
        except ray.exceptions.GetTimeoutError:
            actor_id = shard.rollout_handle._actor_id.hex()
            message = f"rollout actor {actor_id} returned no rollouts within rollout.generate_timeout_s={bound:g}"
            raise UnresponsiveActorError(actor_id, message) from None

    def sync_weights(self) -> None:
        """Bring the rollout actors to the learner's weight version, if they are behind."""
        if self._engine_version != self.version:
            self.push_weights()

    def push_weights(self) -> None:
        """Every rollout actor gets the learner's current weights. An actor busy generating takes them after
        its current batch; with max_staleness 0 the next generation waits for them anyway, so wait here.
        A rollout actor that died or did not answer within the push's bound is replaced, and the push redone."""
        self.confirm_push()
        try:
            self._push = self.learner.push_weights()
        except Exception as error:
            if not self.replace_failed_actor(error):
                raise
            return  # the replacement pushed the weights again
        self._engine_version = self._push.version
        if self.config.training.max_staleness == 0:
            self.confirm_push()

    def confirm_push(self) -> None:
        """Wait until every rollout actor applied the last push; one that died or did not answer within the bound
        is replaced (and the weights pushed again). A dead actor that is no longer in the pool was replaced already."""
        push, self._push = self._push, None
        try:
            if push is not None:
                push.confirm()
        except Exception as error:
            if not (self.replace_failed_actor(error) or is_actor_failure(error)):
                raise

    def replace_failed_actor(self, error: Exception) -> bool:
        """Replace the rollout actors, feature workers or verifiers whose death `error` reports; False if it is none
        of theirs."""
        actor_ids = failed_actor_ids(error) if is_actor_failure(error) else []
        rollout = {i: self.rollout_pool[i] for i in map(self.rollout_pool.index_of, actor_ids) if i is not None}
        pools = [pool for pool in (self.feature_pool, self.verifier_pool) if pool is not None]
        others = [(pool, i) for pool in pools for i in map(pool.index_of, actor_ids) if i is not None]
        for pool, index in others:
            self.replace_actor(pool, index, pool[index], error)
        if rollout:
            self.replace_rollout_actors(rollout, error)
        return bool(rollout or others)

    def replace_rollout_actors(self, failed: dict[int, Any], error: Exception) -> None:
        """Replace the rollout actors {slot: handle} still in the pool, then reconnect and push the weights once."""
        replaced = [
            index for index, handle in failed.items() if self.replace_actor(self.rollout_pool, index, handle, error)
        ]
        if not replaced:
            return
        self._push = None  # its acknowledgments may include the dead actors'
        if self.connect_rollout_actors() and self.version > 0:
            self.push_weights()  # new actors start from the base weights; the others reload the same version

    def replace_actor(self, pool: ActorPool, index: int, failed: Any, error: Exception) -> bool:
        """Replace a pool's dead actor (False if it was replaced already); never during a requested stop, whose
        signal may have reached Ray's processes too: a replacement would wait for a cluster that is going."""
        if self.stop_requested:
            raise error
        replaced = pool.replace(index, failed, error)
        self.restarts += replaced
        return replaced

    def connect_rollout_actors(self) -> bool:
        """Open the weight transport from the learner to the rollout pool; False if an actor failed to join and
        was replaced instead (the replacement connected the pool again)."""
        try:
            self.learner.connect_weight_receivers(list(self.rollout_pool))
            return True
        except Exception as error:
            if not self.replace_failed_actor(error):
                raise
            return False

    @property
    def stages(self) -> Stages | None:
        """The method's stages through the pools; None for SFT, which samples nothing."""
        return STAGES.get(self.config.training.method)

    @property
    def scoring_pool(self) -> ActorPool:
        return self.verifier_pool if self.stages.scoring_pool == "verifiers" else self.feature_pool


@contextmanager
def timed(timings: dict[str, float], phase: str):
    started = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - started


def read_error(ref: ray.ObjectRef) -> None:
    """Read a failed task's error before its ref is dropped, so Ray does not print it as unhandled."""
    try:
        ray.get(ref, timeout=READ_ERROR_TIMEOUT_S)
    except Exception:
        pass


def split_batch(batch: ChunkBatch | PromptBatch, parts: int) -> list:
    """Contiguous, nearly equal shards of whole chunks or questions (no empty shard)."""
    docs = len(batch.ids)
    bounds = [round(i * docs / parts) for i in range(parts + 1)]
    return [batch.part(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
