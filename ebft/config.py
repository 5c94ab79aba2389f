"""The typed run configuration: YAML file + dotted CLI overrides, validated before any work starts.

The sections (one pydantic model each) are in ebft/config_sections.py; here are the whole Config, its checks across
sections, and loading. Import every configuration name from this module."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from ebft.config_sections import (
    CheckpointConfig,
    CompareConfig,
    DataConfig,
    EvalConfig,
    FeaturesConfig,
    LearnerConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PoolResources,
    ResourcesConfig,
    RewardConfig,
    RlvrConfig,
    RolloutConfig,
    SamplingConfig,
    Section,
    SourceConfig,
    TrainingConfig,
)

__all__ = [
    "BROADCAST_TRANSPORTS",
    "CheckpointConfig",
    "CompareConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FeaturesConfig",
    "GLOO",
    "LearnerConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "NCCL",
    "OBJECT_STORE",
    "OptimConfig",
    "PoolResources",
    "ResourcesConfig",
    "RewardConfig",
    "RlvrConfig",
    "RolloutConfig",
    "SamplingConfig",
    "Section",
    "SourceConfig",
    "TrainingConfig",
    "batch_geometry",
    "build_config",
    "cpu_has_native_bf16",
    "dump_config",
    "load_config",
    "parse_override",
]

OBJECT_STORE = "object_store"
NCCL = "nccl"
GLOO = "gloo"
BROADCAST_TRANSPORTS = (NCCL, GLOO)
"""vLLM's weight-transfer protocol (init, start, update, finish) with a broadcast from the learner's rank 0."""


class ConfigError(ValueError):
    """A configuration problem, worded as what is wrong and how to fix it."""


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU computes in bf16 natively (x86 AVX512-BF16 / AMX-BF16, Arm BF16)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith(("flags", "Features")) for flag in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def batch_geometry(config: Config, world_size: int) -> tuple[int, int]:
    """(documents per learner rank, micro-batches per rank) of one optimizer step; every micro-batch is full."""
    docs, micro = config.training.docs_per_step, config.learner.micro_batch_docs
    if docs % (world_size * micro):
        raise ValueError(
            f"training.docs_per_step={docs} must be a multiple of learner ranks ({world_size}) x "
            f"learner.micro_batch_docs ({micro}); "
            f"e.g. set training.docs_per_step={world_size * micro * max(1, docs // (world_size * micro))}"
        )
    return docs // world_size, docs // (world_size * micro)


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    rlvr: RlvrConfig = Field(default_factory=RlvrConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)

    @model_validator(mode="after")
    def _resolve_dtype(self) -> Config:
        if self.model.dtype == "auto":
            r = self.resources
            on_gpus = any(pool.on_gpu for pool in (r.rollout, r.features, r.learner))
            self.model.dtype = "bfloat16" if on_gpus or cpu_has_native_bf16() else "float32"
        return self

    @model_validator(mode="after")
    def _geometry(self) -> Config:
        T, s = self.data.chunk_length, self.sampling
        span = T - s.block_length - s.context_length
        if span < 0:
            raise ValueError(
                f"data.chunk_length={T} is shorter than sampling.context_length + sampling.block_length "
                f"= {s.context_length + s.block_length}; raise data.chunk_length or shorten the blocks"
            )
        if span % s.stride:
            fix = T - span % s.stride
            raise ValueError(
                f"(data.chunk_length - sampling.block_length - sampling.context_length) = {span} is not a "
                f"multiple of sampling.stride={s.stride}; e.g. set data.chunk_length={fix}"
            )
        if s.num_samples < 2:
            raise ValueError(
                f"sampling.num_samples={s.num_samples}: the leave-one-out baseline needs n >= 2 (paper: 4)"
            )
        batch_geometry(self, self.resources.learner.num_actors)
        if self.training.method == "sft" and self.loss.kl_coef > 0:
            raise ValueError(
                "loss.kl_coef > 0 is an EBFT setting (a KL term on the rollouts); training.method=sft generates no "
                "rollouts: set loss.kl_coef=0 or training.method=ebft"
            )
        if self.training.method in ("ebft", "rlvr") and s.top_p < 1:
            raise ValueError(
                f"sampling.top_p={s.top_p}: the learner's log-probs are those of the whole softmax(logits / "
                "temperature), so rollouts from a nucleus would bias the policy gradient and the importance ratios; "
                "set sampling.top_p=1.0 (the paper's setting)"
            )
        return self

    @model_validator(mode="after")
    def _verifiable_data(self) -> Config:
        if self.training.method != "rlvr" and not self.eval.verifier_questions:
            return self
        key = "tests_key" if self.rlvr.reward in ("all_passed", "fraction_passed") else "references_key"
        for index, source in enumerate(self.data.sources):
            if not (source.question_key and getattr(source, key)):
                raise ValueError(
                    f"training.method=rlvr or eval.verifier_questions with rlvr.reward={self.rlvr.reward} scores "
                    "each question's completions "
                    f"against its {key.removesuffix('_key')}: set data.sources[{index}].question_key and .{key} "
                    f"(source {source.path!r})"
                )
        return self

    @model_validator(mode="after")
    def _lora_sync(self) -> Config:
        lora = self.model.lora
        if self.rollout.lora_sync == "adapter" and (lora is None or lora.rank > 512):
            fix = "set model.lora" if lora is None else "lower model.lora.rank (vLLM serves ranks up to 512)"
            raise ValueError(f"rollout.lora_sync=adapter serves LoRA adapters: {fix}, or set rollout.lora_sync=merged")
        return self

    @model_validator(mode="after")
    def _bf16_needs_zero(self) -> Config:
        # DeepSpeed without ZeRO runs bf16 through its fp16 optimizer wrapper with bf16 gradient accumulation. On a
        # tiny model its first AdamW step (lr 3e-3) moved the weights by 0.0022 on average, ZeRO-2's by 0.0030: a
        # first Adam step moves every weight by about lr, as ZeRO-2 does.
        if self.learner.zero_stage == 0 and self.model.dtype == "bfloat16":
            raise ValueError(
                "learner.zero_stage=0 with model.dtype=bfloat16 would train through DeepSpeed's fp16 optimizer "
                "wrapper with bf16 gradient accumulation; set learner.zero_stage to 1 or 2 (on one learner rank they "
                "cost the same memory) or model.dtype=float32"
            )
        return self

    @model_validator(mode="after")
    def _devices(self) -> Config:
        r = self.resources
        for pool in ("features", "learner"):
            gpus = getattr(r, pool).gpus_per_actor
            if gpus > 1:
                raise ValueError(
                    f"resources.{pool}.gpus_per_actor={gpus:g}: a {pool} actor computes on one GPU; set it to 1 and "
                    f"raise resources.{pool}.num_actors instead"
                )
        if r.rollout.gpus_per_actor > 1 and not r.rollout.whole_gpus:
            raise ValueError(
                f"resources.rollout.gpus_per_actor={r.rollout.gpus_per_actor:g}: above 1 it is the tensor-parallel "
                f"size of each engine, a whole number; e.g. set it to {int(r.rollout.gpus_per_actor)} or "
                f"{int(r.rollout.gpus_per_actor) + 1}"
            )
        if r.learner.on_gpu and not r.learner.whole_gpus and r.learner.num_actors > 1:
            raise ValueError(
                f"resources.learner.gpus_per_actor={r.learner.gpus_per_actor:g} with {r.learner.num_actors} learner "
                "ranks: Ray packs shares of a GPU onto one device and NCCL refuses two ranks there ('Duplicate GPU "
                "detected'); set resources.learner.gpus_per_actor=1 or resources.learner.num_actors=1"
            )
        if r.rollout.on_gpu and not r.rollout.whole_gpus:
            # vLLM needs the fraction free at its start-up snapshot and counts other processes' growth during its
            # memory profiling as its own; the other processes on the GPU (CUDA contexts, engines of the same pool)
            # hold memory outside any share, so a fraction equal to the share is never free.
            share, utilization = r.rollout.gpus_per_actor, self.rollout.gpu_memory_utilization
            if utilization >= share:
                raise ValueError(
                    f"resources.rollout.gpus_per_actor={share:g} shares a GPU, but vLLM takes "
                    f"rollout.gpu_memory_utilization={utilization:g} of the whole device and refuses to start unless "
                    f"that much is free beside the other pools on it; set rollout.gpu_memory_utilization below "
                    f"{share:g}, e.g. {share * 0.8:.2g}"
                )
        if self.rollout.batch_invariant and not r.rollout.on_gpu:
            raise ValueError(
                "rollout.batch_invariant=true is for GPU engines (vLLM's batch-invariant kernels are Triton); on CPU a "
                "seeded sample is already independent of batching: set rollout.batch_invariant=false"
            )
        transport = self.weight_transport
        if transport == NCCL:
            if not (r.rollout.on_gpu and r.learner.on_gpu):
                raise ValueError(
                    "rollout.weight_transport=nccl needs GPUs in the rollout and learner pools (resources.rollout / "
                    "resources.learner gpus_per_actor >= 1); with CPU pools set rollout.weight_transport=auto "
                    "(the object store) or gloo"
                )
            if not (r.rollout.whole_gpus and r.learner.whole_gpus):
                raise ValueError(
                    "rollout.weight_transport=nccl with a share of a GPU (gpus_per_actor < 1): NCCL refuses two ranks "
                    "on one GPU; set rollout.weight_transport=auto (the object store) or give each actor a whole GPU"
                )
        if transport == GLOO and (r.rollout.on_gpu or r.learner.on_gpu):
            raise ValueError(
                "rollout.weight_transport=gloo is for CPU pools; with GPUs set rollout.weight_transport=auto (NCCL "
                "between whole GPUs, else the object store)"
            )
        return self

    @property
    def weight_transport(self) -> str:
        """`rollout.weight_transport` resolved: `auto` is NCCL only when both the learner and rollout pools have whole
        GPUs (NCCL refuses two ranks on one GPU), else the object store."""
        choice = self.rollout.weight_transport
        if choice != "auto":
            return choice
        r = self.resources
        return NCCL if r.rollout.whole_gpus and r.learner.whole_gpus else OBJECT_STORE

    @property
    def num_blocks(self) -> int:
        s = self.sampling
        return (self.data.chunk_length - s.block_length - s.context_length) // s.stride + 1


# ----------------------------------------------------------------------------- loading


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = field.annotation
        # list[SourceConfig]: keys of its items; LoraConfig | None: keys of the section
        if get_origin(sub) is list or type(None) in get_args(sub):
            sub = get_args(sub)[0]
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(_valid_keys(sub, prefix + name + "."))
    return keys


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = ".".join(str(p) for p in error["loc"][:-1] if not isinstance(p, int))
        candidates = [k for k in _valid_keys(Config) if k.rsplit(".", 1)[0] == parent or "." not in k and not parent]
        close = difflib.get_close_matches(path if not parent else f"{parent}.{error['loc'][-1]}", candidates, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys here: {', '.join(sorted(candidates))}"
        return f"unknown key `{path}`{hint}"
    if error["type"] in ("value_error", "assertion_error") and not error["loc"]:
        return str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    return f"`{path}`: {str(error['msg']).removeprefix('Value error, ')} (got {given!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`sampling.temperature=0.6` -> (["sampling", "temperature"], 0.6); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override `{text}` is not of the form section.key=value (e.g. sampling.temperature=0.6)")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] = ()) -> Config:
    data: dict[str, Any] = dict(raw or {})
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1], start=1):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                whole = ".".join(path[:depth])
                example = "[{path: python_stdlib}]" if isinstance(child, list) else "VALUE"
                raise ConfigError(
                    f"override `{text}`: `{whole}` is a {type(child).__name__}, not a section; "
                    f"set it whole, e.g. {whole}={example}"
                )
            node = child
        node[path[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "\n  - ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration:\n  - {problems}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
    return build_config(raw, overrides)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
