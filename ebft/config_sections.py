"""The sections of the run configuration: one pydantic model per YAML section, each checking its own fields.

Checks that span sections, resolved values and loading are in ebft/config.py, the module to import from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    tests_key: str | None = None
    """training.method = rlvr, code rewards: the field holding the question's unit tests (a list of pieces of test
    code, or one string), each run in the program's globals after the completion's code."""
    entry_point_key: str | None = None
    """The field naming the function the tests call, if the question asks for one (HumanEval's `entry_point`)."""
    references_key: str | None = None
    """training.method = rlvr, chrF/BLEU rewards: the field holding the reference answer (a string or a list)."""
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
    """The LR rises linearly over the first ceil(warmup_fraction * training.steps) steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After the warmup: `constant` (the paper's EBFT and RLVR recipe) or `cosine`, a half cosine from optim.lr down
    to min_lr_fraction * optim.lr at the last of training.steps (the authors' SFT recipe; docs/method.md section 5)."""
    min_lr_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Where the cosine ends, as a fraction of optim.lr (the authors' SFT: 0.1)."""
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
    verifiers: PoolResources = Field(default_factory=PoolResources)
    """training.method = rlvr: the pool that scores completions, started for RLVR runs only. Each actor runs
    rlvr.sandbox_workers programs at a time: give it as many cpus_per_actor, which its machine time counts."""


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


class RlvrConfig(Section):
    """training.method = rlvr (docs/method.md section 10): n completions per question, scored by a verifier."""

    completions_per_prompt: int = Field(4, ge=2)
    """n: completions sampled per question (the leave-one-out baseline needs n >= 2); at sampling.temperature."""
    max_new_tokens: int = Field(256, ge=1)
    """Each completion stops at EOS or after this many tokens."""
    max_prompt_tokens: int = Field(512, ge=1)
    """Questions longer than this are left out of training (counted as `prompt_too_long` in the data report)."""
    reward: Literal["all_passed", "fraction_passed", "chrf", "bleu"] = "all_passed"
    """`all_passed` / `fraction_passed`: the completion's code run with the question's tests (data.sources[].tests_key);
    `chrf` / `bleu`: the completion against the references (data.sources[].references_key), over 100."""
    divide_by_std: bool = False
    """Divide each question's leave-one-out advantages by the std of its n rewards (+ std_eps)."""
    std_eps: float = Field(1e-6, gt=0.0)
    sandbox_workers: int = Field(2, ge=1)
    """Programs each verifier actor runs at a time."""
    timeout_s: float = Field(5.0, gt=0.0)
    """Wall-clock limit of one completion's program with its tests."""
    memory_mib: int = Field(2048, ge=64)
    """Address-space limit of one program."""


class TrainingConfig(Section):
    method: Literal["ebft", "sft", "rlvr"] = "ebft"
    """`ebft`: feature matching with rollouts (docs/method.md section 5); `sft`: cross-entropy on the same
    chunks with the same optimizer, schedule and data order, and no rollouts (section 7); `rlvr`: n completions
    of each question scored by a verifier, REINFORCE with a leave-one-out baseline (section 10, settings `rlvr:`)."""
    docs_per_step: int = Field(16, ge=1)
    """Documents (each with n rollouts per block) per optimizer step, or with rlvr questions (each with
    rlvr.completions_per_prompt completions); paper: 16 x 4 samples."""
    steps: int = Field(100, ge=1)
    max_staleness: int = Field(0, ge=0)
    machine_budget_s: float | None = Field(None, gt=0)
    """Stop once training used this much machine time (device-seconds, ebft.cluster.cost), evaluating and saving
    there; training.steps still bounds the run. `ebft compare --budget compute` sets it for the SFT arm."""
    max_restarts: int = Field(3, ge=0)
    """Times a run restarts its learner from the last checkpoint (or the run's start) after a learner rank died;
    one more death stops the run with the checkpoint to --resume from."""
    ema: float | None = Field(None, gt=0.0, lt=1.0)
    """Keep an exponential moving average of the policy with this decay (None: off; the authors' configs: 0.9):
    after every optimizer step, average = ema * average + (1 - ema) * weights. Checkpoints save it under `ema/`;
    the rollouts and held-out evaluations use the live weights, and `ebft compare` compares the arm by its average
    (docs/method.md section 5)."""
    seed: int = 0
    output_dir: str = "runs/ebft"


class LoggingConfig(Section):
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "ebft"
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    """The W&B group of the run. `ebft compare` puts every run of its arms in one (this, else the name of its
    training.output_dir), each named after its folder (`sft`, `ebft-seed1`)."""
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
    verifier_questions: int = Field(0, ge=0)
    """Held-out questions with tests or references scored at every evaluation, whatever the method: one completion
    each at eval.temperature, of up to rlvr.max_new_tokens, by rlvr.reward (eval/verifier/<reward>, paired per
    question by `ebft compare`; ebft/evaluation/verifier_eval.py)."""
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


ARM_SHARED_KEYS = ("data.", "eval.", "compare.", "model.policy", "model.feature_model", "training.")
"""What every arm of a compare shares (the base, the data order and held-out selection, the length), so that
their evaluations pair; training.ema and training.max_staleness are an arm's own all the same."""
ARM_OWN_TRAINING_KEYS = ("training.ema", "training.max_staleness")


class CompareArm(Section):
    """One arm of `ebft compare`: a training method and its own recipe over the compare's config."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+]+$")
    """Its label in the table and its run folder under training.output_dir (letters, digits, `_`, `.`, `+`)."""
    method: Literal["ebft", "sft", "rlvr"]
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted keys over the compare's config for this arm alone, e.g. {optim.lr: 1.0e-5, optim.schedule: cosine}."""

    @field_validator("overrides")
    @classmethod
    def _pairing_kept(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key.startswith(ARM_SHARED_KEYS) and key not in ARM_OWN_TRAINING_KEYS:
                raise ValueError(
                    f"`{key}` is shared by every arm (the base, data, held-out selection and length stay the same so "
                    "that their evaluations pair): set it in the compare's config; `method` sets training.method"
                )
        return value


class CompareConfig(Section):
    budget: Literal["steps", "compute"] = "steps"
    """What `ebft compare` holds equal: `steps`, every arm trains training.steps; `compute`, the reference arm trains
    training.steps and every other arm until it used the machine time the reference measured (ebft.cluster.cost),
    evaluated at its end."""
    arms: list[CompareArm] = Field(
        default_factory=lambda: [CompareArm(name="ebft", method="ebft"), CompareArm(name="sft", method="sft")]
    )
    """The arms, each from the same base on the same chunks; the table pairs every arm with the base and every two
    arms (in this order: `a - b` for a listed before b)."""
    reference: str | None = None
    """The arm that evaluates the base and, at budget `compute`, sets the machine time; None: the first arm."""
    seeds: list[int] | None = None
    """Training seeds: every arm trains once per seed (training.seed of each run), and the intervals account for
    the seeds as well as the held-out chunks (docs/method.md section 8); None: training.seed alone."""

    @model_validator(mode="after")
    def _arms(self) -> CompareConfig:
        names = [arm.name for arm in self.arms]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"compare.arms needs two or more arms with distinct names (got {names})")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"compare.reference={self.reference!r} is not an arm; name one of {names}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"compare.seeds needs one or more distinct seeds (got {self.seeds})")
        return self

    @property
    def reference_arm(self) -> CompareArm:
        return next(arm for arm in self.arms if arm.name == (self.reference or self.arms[0].name))
