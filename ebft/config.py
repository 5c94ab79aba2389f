"""The typed run configuration: YAML file + dotted CLI overrides, validated before any work starts."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OBJECT_STORE = "object_store"
NCCL = "nccl"
GLOO = "gloo"
BROADCAST_TRANSPORTS = (NCCL, GLOO)
"""vLLM's weight-transfer protocol (init, start, update, finish) with a broadcast from the learner's rank 0."""


class ConfigError(ValueError):
    """A configuration problem, worded as what is wrong and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    """LoRA adapters on the policy (PEFT): only they train; the rollout engines get the merged weights."""

    rank: int = Field(16, ge=1)
    """r: the rank of each adapter's update B @ A."""
    alpha: float = Field(32.0, gt=0.0)
    """The update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input in training."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers to adapt, by name or dotted suffix (`q_proj`, `mlp.down_proj`); the default is every attention
    and MLP projection of Llama-like models. Checked against the policy before a run starts."""

    @field_validator("target_modules")
    @classmethod
    def _names_given(cls, value: list[str]) -> list[str]:
        if not value or any(not name.strip() for name in value):
            raise ValueError("name one or more linear layers, e.g. [q_proj, v_proj]")
        return value


class ModelConfig(Section):
    policy: str = "smollm2"
    """Local HF folder, hub id, or the built-in alias `smollm2` (see `ebft models prepare smollm2`)."""
    feature_model: str | None = None
    """Frozen feature network; defaults to the base policy checkpoint, as in the paper."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bfloat16 on GPUs or on a CPU with native bf16 (AVX512-BF16, AMX, Arm BF16), else float32:
    emulated bf16 is several times slower than float32. A run's saved config.yaml records the resolved value."""
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of the full weights (None: full fine-tuning), for both training methods."""


class SourceConfig(Section):
    path: str
    """A .jsonl/.parquet/.txt/.py file, a directory of them, `hf:NAME` for a HF dataset, or `python_stdlib`."""
    format: Literal["auto", "jsonl", "parquet", "text", "hf", "python_stdlib"] = "auto"
    text_key: str = "text"
    question_key: str | None = None
    answer_key: str | None = None
    split: str = "train"


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="python_stdlib")])
    chunk_length: int = Field(1024, gt=0)
    """T: tokens per training document chunk."""
    heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    shuffle: bool = True
    max_examples: int | None = Field(None, gt=0)


class SamplingConfig(Section):
    context_length: int = Field(8, gt=0)
    """C: tokens of the shortest prefix."""
    stride: int = Field(8, gt=0)
    """s: distance between consecutive block starts."""
    block_length: int = Field(8, gt=0)
    """G: tokens generated per block."""
    num_samples: int = 4
    """n: rollouts per block."""
    temperature: float = Field(0.6, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class FeaturesConfig(Section):
    layer_fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])
    pooling: Literal["last", "mean"] = "last"
    token_budget: int = Field(16384, gt=0)
    """Packed tokens per feature forward (micro-batching)."""
    attention: Literal["dense", "blocks"] = "blocks"
    """How rollout rows attend to the cached document: `dense` under the packed mask, `blocks` only within each
    block's group (ebft/packed_attention.py); same features."""

    @field_validator("layer_fractions")
    @classmethod
    def _fractions_in_range(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 <= f <= 1.0 for f in value):
            raise ValueError("give one or more fractions in [0, 1], e.g. [0.25, 0.5, 0.75]")
        return value


class RewardConfig(Section):
    alignment_coef: float = 1.0
    diversity_coef: float = 1.0
    whitening: Literal["none", "sample", "feature"] = "sample"
    tol: float = Field(1e-5, gt=0.0)


class LossConfig(Section):
    rl_coef: float = 1.0
    ce_coef: float = 0.03
    kl_coef: float = 0.0
    ratio_truncation: float = Field(2.0, gt=0.0)
    """Upper bound of the importance ratio pi/pi_behavior applied to stale rollouts."""


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0.0)
    warmup_fraction: float = Field(0.03, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)


class PoolResources(Section):
    num_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    threads: int | None = Field(None, ge=1)
    """torch/OpenMP threads of each actor. None: floor(cpus_per_actor), at least 1; a CPU learner rank whose
    training nothing overlaps (training.max_staleness 0) takes its node's cores (README "Resources")."""
    node_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each actor also needs, e.g. {"rollout_node": 1} to keep the pool on nodes started
    with `ray start --resources='{"rollout_node": 8}'` (README "Resources")."""

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_actor > 0

    @property
    def whole_gpus(self) -> bool:
        """One or more whole GPUs per actor (not a share of one)."""
        return self.gpus_per_actor >= 1 and float(self.gpus_per_actor).is_integer()

    @field_validator("node_resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = {"CPU", "GPU", "memory", "object_store_memory"} & set(value)
        if builtin:
            raise ValueError(f"{sorted(builtin)} are set by cpus_per_actor / gpus_per_actor; name custom resources")
        if any(amount <= 0 for amount in value.values()):
            raise ValueError("every amount must be > 0")
        return value


class ResourcesConfig(Section):
    rollout: PoolResources = Field(default_factory=PoolResources)
    features: PoolResources = Field(default_factory=PoolResources)
    learner: PoolResources = Field(default_factory=PoolResources)


class RolloutConfig(Section):
    kv_cache_gib: float = Field(1.0, gt=0.0)
    """KV-cache bound of each vLLM engine (always set: an unbounded CPU engine takes ~10 GB)."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    weight_transport: Literal["auto", "object_store", "nccl", "gloo"] = "auto"
    """`auto`: NCCL when the rollout and learner pools have whole GPUs each, else the weights' bytes through the Ray
    object store (CPU pools, or pools sharing a GPU). `gloo`: vLLM's weight-transfer protocol, as NCCL runs it, over
    gloo between CPU pools."""
    weight_buffer_mib: float = Field(1024.0, gt=0.0)
    """Broadcast transports: the weights travel packed in buffers of about this size (vLLM's default)."""
    weight_sync_timeout_s: float = Field(600.0, gt=0.0)
    """Bound of every wait in a weight push (receivers entering it, the broadcast, their acknowledgment): a rollout
    actor that does not answer within it is replaced, and one whose learner died mid-push gives up and takes the
    restarted learner's connection. An actor takes a push after the generation it is busy with, so keep it well
    above one generate call of a shard (seconds on GPUs, ~5-60 s in the CPU demos)."""
    generate_timeout_s: float = Field(1800.0, gt=0.0)
    """Bound of the controller's wait for one shard's rollouts: a rollout actor that has not returned them within it
    (a wedged engine, a hung collective) is replaced and the shard generated again. Keep it well above one shard's
    generation plus the weight pushes queued before it (seconds on GPUs, ~5-60 s in the CPU demos) and, for a run's
    first shards, the engines' start."""
    batch_invariant: bool = False
    """GPU rollout pools: vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1), so that a seeded sample does not
    depend on what else the engine batched with it and a resumed run or an evaluation samples the same tokens on
    GPUs too (README "Reproducibility"); slower matmuls and attention. CPU engines need no such mode."""
    enforce_eager: bool | None = None
    """Run the engine's model without torch.compile (and CUDA graphs). None: eager on CPU, where compiling costs
    ~40-110 s at every start (vLLM's compile cache does not load there) for no measurable gain in these
    batches (docs/results.md "Demo timings"); compiled on GPU."""
    lora_sync: Literal["merged", "adapter"] = "merged"
    """With model.lora, what a push does in the engines: `merged` adds the adapters into the engine's weights and
    serves a plain model; `adapter` registers them with vLLM's LoRA layers, which apply them at every token (a push
    costs milliseconds instead of a reload). Merged is the default: adapter serving generated several times slower
    on CPU and a step took longer overall (docs/results.md "LoRA"); on GPUs measure both (benchmarks/lora.py)."""


class LearnerConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    micro_batch_docs: int = Field(1, ge=1)
    """Documents per forward/backward; gradient accumulation makes up training.docs_per_step."""
    gradient_checkpointing: bool = True
    offload_optimizer: bool = False
    attention: Literal["dense", "blocks"] = "blocks"
    """How a packed row attends: `dense` scores all S^2 pairs under the packed mask; `blocks` scores only the
    document's causal part and each block's group (ebft/packed_attention.py); same log-probs."""


class TrainingConfig(Section):
    method: Literal["ebft", "sft"] = "ebft"
    """`ebft`: feature matching with rollouts (docs/method.md section 5); `sft`: cross-entropy on the same
    chunks with the same optimizer, schedule and data order, and no rollouts (section 7)."""
    docs_per_step: int = Field(16, ge=1)
    """Documents (each with n rollouts per block) per optimizer step; paper: 16 x 4 samples."""
    steps: int = Field(100, ge=1)
    max_staleness: int = Field(0, ge=0)
    machine_budget_s: float | None = Field(None, gt=0)
    """Stop once training used this much machine time (device-seconds, ebft.cluster.cost), evaluating and saving
    there; training.steps still bounds the run. `ebft compare --budget compute` sets it for the SFT arm."""
    max_restarts: int = Field(3, ge=0)
    """Times a run restarts its learner from the last checkpoint (or the run's start) after a learner rank died;
    one more death stops the run with the checkpoint to --resume from."""
    seed: int = 0
    output_dir: str = "runs/ebft"


class LoggingConfig(Section):
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "ebft"
    entity: str | None = None
    run_name: str | None = None
    samples_every: int = Field(10, ge=1)


class CheckpointConfig(Section):
    every: int = Field(0, ge=0)
    """Save every N steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)


class EvalConfig(Section):
    every: int = Field(0, ge=0)
    """Evaluate every N steps, at the end, and at step 0 if at_start; 0: no held-out evaluation at all."""
    num_docs: int = Field(8, ge=1)
    """Held-out chunks: a fixed seeded selection spread over as many source files as possible."""
    num_samples: int = Field(16, ge=2)
    """Rollouts per block at evaluation (independent of sampling.num_samples); >= 2 for the unbiased CFM."""
    seed: int = 0
    """Chooses the held-out chunks and their sampling seeds: every evaluation of a run, and every run with the
    same seed, sees the same chunks and random numbers, so two checkpoints are compared pairwise."""
    at_start: bool = True
    """Evaluate the starting weights at step 0 (`ebft compare` evaluates the base once for both methods)."""
    humaneval_problems: int = Field(0, ge=0)
    """HumanEval problems to run (0: skip; 164: all)."""
    num_completions: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    max_new_tokens: int = Field(256, ge=1)
    timeout_s: float = Field(5.0, gt=0.0)
    translation_file: str | None = None
    """A jsonl of {source, reference} scored with corpus BLEU by `ebft eval` (None: skip)."""
    comet_checkpoint: str | None = None
    """A local COMET checkpoint (e.g. wmt22-comet-da's model.ckpt) to score the translations with COMET as well as
    BLEU (None: BLEU only); needs the optional `unbabel-comet` package."""
    translation_prompt: str = "Translate the following text.\n\nText: {source}\nTranslation:"
    """Prompt of each translation; `{source}` is replaced by the source text. Generation stops at a newline."""

    @field_validator("translation_prompt")
    @classmethod
    def _prompt_has_source(cls, value: str) -> str:
        if "{source}" not in value:
            raise ValueError("the template must contain `{source}`, where the source text goes")
        return value


class CompareConfig(Section):
    budget: Literal["steps", "compute"] = "steps"
    """What `ebft compare` holds equal: `steps`, SFT trains as many steps as EBFT; `compute`, SFT trains until it
    used the machine time the EBFT arm measured (ebft.cluster.cost), evaluated at its end."""


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
        if self.training.method == "ebft" and s.top_p < 1:
            raise ValueError(
                f"sampling.top_p={s.top_p}: the learner's log-probs are those of the whole softmax(logits / "
                "temperature), so rollouts from a nucleus would bias the policy gradient and the importance ratios; "
                "set sampling.top_p=1.0 (the paper's setting)"
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
        if r.rollout.on_gpu and not r.rollout.whole_gpus:
            share = r.rollout.gpus_per_actor
            if self.rollout.gpu_memory_utilization > share:
                raise ValueError(
                    f"resources.rollout.gpus_per_actor={share:g} shares a GPU, but vLLM takes "
                    f"rollout.gpu_memory_utilization={self.rollout.gpu_memory_utilization:g} of the whole device and "
                    f"refuses to start unless that much is free; set rollout.gpu_memory_utilization={share:g} or less"
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
