"""`ebft train`: validate everything, start the pools on Ray, run the controller, report."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch
import yaml

from ebft.cluster.controller import Controller, RestorePoint, StepResult, timed
from ebft.cluster.cost import machine_seconds
from ebft.cluster.monitor import Monitor, sample_rows, throughput
from ebft.cluster.placement import create_placement_groups
from ebft.cluster.pools import ActorPool
from ebft.cluster.stopping import (
    failed_during_stop,
    local_cluster_alive,
    ray_processes_in_groups_of_their_own,
    stop_on_interrupt,
)
from ebft.config import Config, ConfigError, build_config, dump_config
from ebft.evaluation.code import humaneval_path
from ebft.evaluation.heldout import Evaluation, HeldoutEvaluator, paired_differences
from ebft.evaluation.humaneval import code_eval, humaneval_problems

if TYPE_CHECKING:
    from ebft.data.chunks import ChunkStream, PreparedData

log = logging.getLogger(__name__)

# The longest HumanEval prompt is ~650 SmolLM2 tokens.
HUMANEVAL_MAX_PROMPT_TOKENS = 768

# Environment of every process of the job. What one pool needs lives with it (the vLLM engine's in
# ebft.actors.pool; DeepSpeed picks its accelerator on each learner's own node).
JOB_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    # Everything an actor logs goes to its file in <run>/logs (ebft.actor_output), so keep all of vLLM's.
    "VLLM_LOGGING_LEVEL": "INFO",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


@dataclass
class TrainSummary:
    run_dir: Path
    method: str
    steps: int
    trained_chunks: int
    scheduled_chunks: int
    generated_tokens: int
    restarts: int
    evaluations: list[Evaluation]
    """The held-out evaluations of this run, in step order (per-chunk values included)."""
    plot: Path | None
    wandb_dir: str | None
    checkpoint: Path | None
    trained_chunk_ids: list[int]
    machine_s: float = 0.0
    """Device-seconds its pools spent training (ebft.cluster.cost)."""
    stopped_early: bool = False

    @property
    def first_eval(self) -> dict[str, float]:
        return self.evaluations[0].metrics if self.evaluations else {}

    @property
    def last_eval(self) -> dict[str, float]:
        return self.evaluations[-1].metrics if self.evaluations else {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def connect_ray(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": JOB_ENV}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # "local": always a fresh single-node runtime, never a stray cluster some other process left on the machine.
        with ray_processes_in_groups_of_their_own():
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, 2),
                include_dashboard=False,
                runtime_env=env,
                log_to_driver=True,
            )


def prepare_run_dir(config: Config, resume: bool) -> tuple[Path, Path | None, dict[str, int]]:
    """The run folder, the checkpoint to resume (None: a new run) and the step and weight version it starts at."""
    from ebft.learner.checkpoint import latest_checkpoint

    run_dir = Path(config.training.output_dir)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if run_dir.exists() else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}; start without --resume")
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, or set training.output_dir to a new folder"
        )
    start = _read_start(checkpoint)
    if resume:
        check_same_run(run_dir, config)
        if start["step"] > config.training.steps:
            raise ConfigError(
                f"{run_dir} has trained {start['step']} steps, more than training.steps={config.training.steps}; "
                f"set training.steps >= {start['step']} to continue it, or use another training.output_dir"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    return run_dir, checkpoint, start


# What a continued run may change: how long it trains, and how it runs, logs, evaluates and checkpoints.
# Everything else defines what is trained (model, data, sampling, features, reward, loss, optimizer, ZeRO stage).
CONTINUABLE = (
    *("training.steps", "training.max_restarts", "training.output_dir"),
    *("learner.micro_batch_docs", "learner.gradient_checkpointing", "learner.offload_optimizer", "learner.attention"),
    *("resources.", "rollout.", "logging.", "eval.", "checkpoint.", "compare."),
)


def check_same_run(run_dir: Path, config: Config) -> None:
    """Refuse to continue the run in `run_dir` with settings that change what it trains (its config.yaml)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved_raw = yaml.safe_load(saved_path.read_text())
    try:  # settings added to ebft since the run started take their defaults
        saved_raw = build_config(saved_raw).model_dump(mode="json")
    except ConfigError:
        pass  # a setting no longer accepted: compare what the file says
    saved, wanted = flatten(saved_raw), flatten(config.model_dump(mode="json"))
    changed = [
        f"{key}: {saved.get(key)!r} -> {wanted.get(key)!r}"
        for key in sorted(saved.keys() | wanted.keys())
        if saved.get(key) != wanted.get(key) and not key.startswith(CONTINUABLE)
    ]
    if changed:
        raise ConfigError(
            f"{run_dir} was trained with other settings, which a continued run cannot change:\n  - "
            + "\n  - ".join(changed)
            + f"\ncontinue with the run's own settings ({saved_path}) or start a new run in another output_dir"
        )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run(config: Config, *, resume: bool = False, address: str | None = None) -> TrainSummary:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns, in every process, that it found no GPU
    inputs = RunInputs.prepare(config, resume)  # everything that can be wrong with the inputs fails here
    connect_ray(address)
    with Pools(config, inputs) as pools:
        recorder = RunRecorder(config, inputs, pools)
        controller = Controller(
            config,
            pools.rollout,
            pools.features,
            pools.learner,
            inputs.stream,
            step=inputs.start["step"],
            version=inputs.start["version"],
            on_step=recorder.on_step,
            evaluate=recorder.evaluate if recorder.evaluator.enabled else None,
            save=recorder.save,
            restart_learner=recorder.restart_learner,
            checkpoint=inputs.checkpoint,
            machine_s=machine_seconds(recorder.monitor.history),
            verifier_pool=pools.verifiers,
        )
        try:
            with stop_on_interrupt(controller):
                controller.run()
        except Exception as error:
            if controller.stop_requested:
                failed_during_stop(controller, error)
            raise
        finally:
            recorder.close()
    return recorder.summary(controller)


@dataclass
class RunInputs:
    """What a run reads before any actor starts: model paths, the run folder, the checkpoint to resume, data."""

    policy_path: str
    feature_path: str
    run_dir: Path
    checkpoint: Path | None
    start: dict[str, int]
    tokenizer: Any
    data: PreparedData
    stream: ChunkStream

    @classmethod
    def prepare(cls, config: Config, resume: bool) -> RunInputs:
        from transformers import AutoTokenizer

        from ebft.data.chunks import prepare_data
        from ebft.model_sources import resolve_run_models

        policy_path, feature_path = resolve_run_models(config)
        if config.eval.every and config.eval.humaneval_problems:
            humaneval_path()  # the package is there
        run_dir, checkpoint, start = prepare_run_dir(config, resume)
        seed_everything(config.training.seed)
        tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=config.model.trust_remote_code)
        data = prepare_data(config.data, tokenizer)
        if config.training.method == "rlvr":
            from ebft.data.tasks import prompt_stream

            stream = prompt_stream(data, tokenizer, config)
        else:
            stream = data.stream(seed=config.training.seed, shuffle=config.data.shuffle)
        return cls(policy_path, feature_path, run_dir, checkpoint, start, tokenizer, data, stream)


class Pools:
    """The three pools in their placement groups; the learner holds the resumed state and a weight transport
    to the rollout actors. Everything is released on exit, whatever happened."""

    def __init__(self, config: Config, inputs: RunInputs):
        from ebft.actors.pool import create_rollout_actor
        from ebft.features.pool import create_feature_worker

        self.config, self.inputs = config, inputs
        self.groups = create_placement_groups(config)
        self.rollout = self.features = self.learner = self.verifiers = None
        self.logs = logs = (inputs.run_dir / "logs").resolve()  # every actor's own output; the console shows the run's
        log.info("actor logs: %s", logs)
        # HumanEval prompts and completions are longer than a training chunk.
        max_model_len = config.data.chunk_length + config.sampling.block_length
        if config.eval.every and config.eval.humaneval_problems:
            max_model_len = max(max_model_len, HUMANEVAL_MAX_PROMPT_TOKENS + config.eval.max_new_tokens)
        if config.training.method == "rlvr":
            max_model_len = max(max_model_len, config.rlvr.max_prompt_tokens + config.rlvr.max_new_tokens)
        try:
            self.rollout = ActorPool(
                "rollout",
                lambda i: create_rollout_actor(
                    config,
                    inputs.policy_path,
                    self.groups["rollout"],
                    i,
                    max_model_len=max_model_len,
                    log_file=f"{logs}/rollout-{i}.log",
                ),
                config.resources.rollout.num_actors,
                self.groups["rollout"],
            )
            if config.resources.rollout.on_gpu and not config.resources.rollout.whole_gpus:
                # vLLM needs its share of the GPU free when it starts and counts other processes' growth during its
                # memory profiling as its own: the pools that share the GPU start once the engines are up.
                for index in range(len(self.rollout)):
                    self.rollout.wait_until_started(index)
            self.features = ActorPool(
                "features",
                lambda i: create_feature_worker(
                    config, inputs.feature_path, self.groups["features"], i, log_file=f"{logs}/features-{i}.log"
                ),
                config.resources.features.num_actors,
                self.groups["features"],
            )
            if config.training.method == "rlvr":
                from ebft.verifiers.pool import create_verifier

                self.verifiers = ActorPool(
                    "verifiers",
                    lambda i: create_verifier(config, self.groups["verifiers"], i, log_file=f"{logs}/verifier-{i}.log"),
                    config.resources.verifiers.num_actors,
                    self.groups["verifiers"],
                )
            extra = self.start_learner(inputs.checkpoint)
            if inputs.checkpoint:
                inputs.stream.load_state_dict(extra["data_state"])
                log.info("resumed from %s at step %d", inputs.checkpoint, inputs.start["step"])
        except BaseException:
            self.shutdown()
            raise

    def start_learner(self, checkpoint: Path | None, connect: bool = True) -> dict[str, Any]:
        """A learner group at `checkpoint` (None: the base weights), connected to the rollout actors unless the
        caller connects it; a previous group (one of whose ranks died) is stopped first. Returns the checkpoint's
        extra state ({} if none)."""
        from ebft.learner.group import LearnerGroup

        if self.learner is not None:
            self.learner.shutdown()
            self.learner = None
        self.learner = LearnerGroup(self.config, self.inputs.policy_path, self.groups["learner"], log_dir=self.logs)
        extra = self.learner.load_checkpoint(checkpoint) if checkpoint else {}
        if connect:
            self.learner.connect_weight_receivers(list(self.rollout))
        return extra

    def shutdown(self) -> None:
        for pool in (self.learner, self.rollout, self.features, self.verifiers):
            if pool is not None:
                pool.shutdown()
        for group in self.groups.values():
            ray.util.remove_placement_group(group)

    def __enter__(self) -> Pools:
        return self

    def __exit__(self, *exc) -> None:
        if local_cluster_alive():
            self.shutdown()
        else:  # the actors went with it; leave it, so that nothing (Ray's own excepthook too) waits on its dead GCS
            ray.shutdown()


class RunRecorder:
    """What the controller's hooks do for a run: log each step, evaluate, save checkpoints, and sum it up."""

    def __init__(self, config: Config, inputs: RunInputs, pools: Pools):
        self.config, self.inputs, self.pools = config, inputs, pools
        start = inputs.start["step"]
        self.monitor = Monitor(config, inputs.run_dir, start_step=start, resumed=inputs.checkpoint is not None)
        data = inputs.data
        heldout = data.heldout_batch(config.eval.num_docs, seed=config.eval.seed) if len(data.heldout) else (None, None)
        self.evaluator = HeldoutEvaluator(config, *heldout)
        self.code_problems = humaneval_problems(config.eval.humaneval_problems) if self.evaluator.enabled else []
        self.questions = None
        if self.evaluator.enabled and config.eval.verifier_questions:
            from ebft.evaluation.verifier_eval import heldout_questions

            self.questions = heldout_questions(data.verifiable.get("heldout", []), inputs.tokenizer, config)
        self.saved: list[Path] = []
        # A resumed run's summary compares its end with the evaluations before the resume (the base's included).
        self.evaluations = load_evaluations(inputs.run_dir, start) if inputs.checkpoint else []
        self.plot: Path | None = None

    def on_step(self, result: StepResult) -> None:
        self.monitor.log(result.step, {**result.metrics, **throughput(self.config, result)})
        ebft = self.config.training.method == "ebft"
        if ebft and result.rollouts and (result.step + 1) % self.config.logging.samples_every == 0:
            self.monitor.log_samples(result.step, sample_rows(self.config, self.inputs.tokenizer, result))

    def evaluate(self, step: int) -> None:
        rollout, features = self.pools.rollout[0], self.pools.features[0]
        chunks = len(self.evaluator.chunks.chunk_ids)
        self.monitor.status(
            f"evaluating step {step}: {chunks} held-out chunks x {self.config.eval.num_samples} samples"
        )
        timings: dict[str, float] = {}

        def timed_call(phase: str, function: Callable) -> Callable:
            def call(*args, **kwargs):
                with timed(timings, f"timing/eval_{phase}"):
                    return function(*args, **kwargs)

            return call

        with timed(timings, "timing/eval_total"):
            evaluation = self.evaluator.run(
                # Nothing else runs while the evaluation generates and embeds: those calls may take every core.
                timed_call("generate", lambda chunks, n: ray.get(rollout.generate.remote(chunks, n, alone=True))),
                timed_call("features", lambda rollouts: ray.get(features.extract.remote(rollouts, alone=True))),
                timed_call("document_ce", self.pools.learner.document_ce),
                step=step,
            )
            if self.code_problems:

                def complete(prompts, **options):
                    return ray.get(rollout.complete.remote(prompts, **options, alone=True))

                with timed(timings, "timing/eval_humaneval"):
                    code = code_eval(complete, self.code_problems, self.config)
                evaluation.metrics.update(code.metrics)
                evaluation.per_problem.update(code.per_problem)
            if self.questions:
                from ebft.evaluation.verifier_eval import verifier_eval

                def complete_ids(prompts, **options):
                    return ray.get(rollout.complete.remote(prompts, **options, alone=True))

                with timed(timings, "timing/eval_verifier"):
                    metrics, per_question = verifier_eval(
                        complete_ids, self.questions, self.inputs.tokenizer, self.config
                    )
                evaluation.metrics.update(metrics)
                evaluation.per_problem.update(per_question)
        evaluation.save(evaluation_path(self.inputs.run_dir, step))
        self.evaluations.append(evaluation)
        self.monitor.log(step, {**evaluation.metrics, **timings})

    def save(self, step: int, resume_state: dict[str, Any]) -> Path:
        from ebft.learner.checkpoint import checkpoint_path

        path = checkpoint_path(self.inputs.run_dir / "checkpoints", step)
        self.pools.learner.save_checkpoint(path, {"data_state": resume_state})
        self.saved.append(path)
        return path

    def restart_learner(self, point: RestorePoint):
        """A new learner group at the restore point, not yet connected to the rollout actors; what the run recorded
        after it is forgotten."""
        self.pools.start_learner(point.checkpoint, connect=False)
        self.monitor.rewind(point.step)
        self.evaluations = [e for e in self.evaluations if e.step <= point.step]  # of weights it keeps
        return self.pools.learner

    def close(self) -> None:
        self.monitor.close()
        first, *later = self.evaluations or [None]
        self.plot = self.monitor.plot({e.step: paired_differences(e, first) for e in later})

    def summary(self, controller: Controller) -> TrainSummary:
        config, start = self.config, self.inputs.start["step"]
        s = config.sampling
        generated_per_chunk = (
            config.num_blocks * s.block_length * s.num_samples if config.training.method == "ebft" else 0
        )
        return TrainSummary(
            run_dir=self.inputs.run_dir,
            method=config.training.method,
            steps=controller.step,
            trained_chunks=len(controller.trained_chunk_ids),
            scheduled_chunks=(controller.step - start) * config.training.docs_per_step,
            generated_tokens=len(controller.trained_chunk_ids) * generated_per_chunk,
            restarts=controller.restarts,
            evaluations=self.evaluations,
            plot=self.plot,
            wandb_dir=self.monitor.wandb_dir,
            checkpoint=self.saved[-1] if self.saved else None,
            trained_chunk_ids=controller.trained_chunk_ids,
            machine_s=controller.machine_s,
            stopped_early=controller.step < config.training.steps and not controller.budget_spent,
        )


def evaluation_path(run_dir: Path, step: int) -> Path:
    """Where the evaluation at `step` keeps its per-chunk values."""
    return run_dir / "evals" / f"step_{step:08d}.json"


def load_evaluations(run_dir: Path, steps: int) -> list[Evaluation]:
    """The run's saved evaluations up to `steps` trained (a longer run in the same folder may have more)."""
    evaluations = [Evaluation.load(path) for path in sorted((run_dir / "evals").glob("step_*.json"))]
    return [evaluation for evaluation in evaluations if evaluation.step <= steps]


def _read_start(checkpoint: Path | None) -> dict[str, int]:
    if checkpoint is None:
        return {"step": 0, "version": 0}
    from ebft.learner.checkpoint import read_trainer_state

    state = read_trainer_state(checkpoint)
    return {"step": int(state["step"]), "version": int(state["weight_version"])}
