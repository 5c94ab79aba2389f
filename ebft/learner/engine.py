"""One DeepSpeed rank of the EBFT learner, usable in-process (tests) or inside a Ray actor (group.py).

A training step takes this rank's share of the step's documents (rollouts + pooled features),
turns features into per-block advantages with `compute_rewards`, and runs one packed forward per
document (the document once, then its n samples of every block; ebft/layout.py) in micro-batches of
`learner.micro_batch_docs` documents. Each
micro-batch loss is a mean over its sequences; DeepSpeed divides by the accumulation steps and
averages over ranks, so the accumulated gradient is the gradient of the full-batch loss (the mean
over all docs_per_step * n sequences). Every micro-batch therefore has the same size and every rank
the same number of documents.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ebft import weight_transport
from ebft.config import Config
from ebft.layout import BlockPlan
from ebft.learner import checkpoint as ckpt
from ebft.learner.batches import prepare_inputs
from ebft.learner.loss import document_ce as document_nll
from ebft.learner.loss import ebft_loss, generated_logprobs
from ebft.messages import ChunkBatch, FeatureBatch, RolloutBatch, WeightUpdate

METRIC_PREFIX = "train/"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def import_deepspeed():
    """Import DeepSpeed for this machine: the CPU accelerator when there is no GPU, and on CPU without
    the shared-memory comm op, whose JIT build costs ~30 s per process and only speeds up large
    intra-node all-reduces."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        # `import deepspeed.comm.torch as m` would bind the torch package (a name clash); fetch the module.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def warmup_steps(config: Config) -> int:
    return math.ceil(config.optim.warmup_fraction * config.training.steps)


def lr_factor(step_index: int, warmup: int) -> float:
    """LR multiplier of optimizer step step_index (0-based): linear over the first `warmup` steps, then 1."""
    return 1.0 if warmup <= 0 else min(1.0, (step_index + 1) / warmup)


# ----------------------------------------------------------------------------- the rank


class LearnerRank:
    """A DeepSpeed rank holding the policy, its optimizer and LR schedule.

    All ranks must call train_step, export_weights, save_checkpoint and load_checkpoint together
    (they are collective). For world_size 1 in-process, the rendezvous variables are set here.
    """

    def __init__(
        self,
        config: Config,
        model_path: str | os.PathLike,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int | None = None,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
    ):
        self.config, self.model_path = config, str(model_path)
        self.rank, self.world_size = rank, world_size
        self.samples = config.sampling.num_samples
        self.plan = replace(BlockPlan.from_config(config), samples=self.samples)
        self.micro_batch_docs = config.learner.micro_batch_docs
        self.docs_per_rank, self.accumulation_steps = self.batch_geometry(config, world_size)
        self.dtype = _DTYPES[config.model.dtype]
        if config.learner.offload_optimizer and config.learner.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage >= 1")

        local_rank = rank if local_rank is None else local_rank
        for key, value in {
            "RANK": rank,
            "WORLD_SIZE": world_size,
            "LOCAL_RANK": local_rank,
            "MASTER_ADDR": master_addr,
        }.items():
            os.environ[key] = str(value)
        if master_port is not None or "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(master_port or free_port())
        deepspeed = import_deepspeed()
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        self.on_gpu = accelerator.device_name() != "cpu"
        if self.on_gpu:
            accelerator.set_device(local_rank)
        self.device = torch.device(accelerator.device_name(local_rank) if self.on_gpu else "cpu")
        if dist.is_initialized() and dist.get_world_size() != world_size:
            raise RuntimeError(
                f"this process already joined a process group of size {dist.get_world_size()}, not {world_size}"
            )
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo", verbose=False)

        ds_config = self._deepspeed_config()
        model = self._load_model(ds_config)
        optimizer = None
        if not (config.learner.offload_optimizer and self.on_gpu):
            # On CPU a torch AdamW avoids DeepSpeed's JIT-built Adam; on GPU with offload DeepSpeed
            # builds its CPU Adam from the "optimizer" section instead.
            o = config.optim
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
            )
        warmup = warmup_steps(config)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, warmup)),
        )
        self.reference_model = self._load_reference_model(ds_config) if config.loss.kl_coef > 0 else None
        self.step = 0
        self.weight_version = 0
        self.captured_gradients: dict[str, torch.Tensor] | None = None
        self.weight_sender: weight_transport.WeightSender | None = None
        self._last_lr = float("nan")
        self._grad_norm_fallback: float | None = None
        self._mask = self.plan.attention_mask(self.dtype).to(self.device)
        self._positions = self.plan.position_ids.to(self.device)

    @staticmethod
    def batch_geometry(config: Config, world_size: int) -> tuple[int, int]:
        docs, micro = config.training.docs_per_step, config.learner.micro_batch_docs
        if docs % (world_size * micro):
            raise ValueError(
                f"training.docs_per_step={docs} must be a multiple of learner ranks ({world_size}) x "
                f"learner.micro_batch_docs ({micro}); "
                f"e.g. set training.docs_per_step={world_size * micro * max(1, docs // (world_size * micro))}"
            )
        return docs // world_size, docs // (world_size * micro)

    def _deepspeed_config(self) -> dict[str, Any]:
        cfg = self.config
        zero: dict[str, Any] = {"stage": cfg.learner.zero_stage}
        if cfg.learner.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.on_gpu}
        ds_config = {
            "train_micro_batch_size_per_gpu": self.micro_batch_docs * self.samples,
            "gradient_accumulation_steps": self.accumulation_steps,
            "train_batch_size": self.micro_batch_docs * self.samples * self.accumulation_steps * self.world_size,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": self.dtype == torch.float16},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        if cfg.learner.offload_optimizer and self.on_gpu:
            o = cfg.optim
            ds_config["optimizer"] = {
                "type": "AdamW",
                "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay},
            }
        return ds_config

    def _from_pretrained(self, ds_config: dict[str, Any]):
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        # Under ZeRO-3 this object must be alive during from_pretrained: each rank then loads only its partition.
        zero3_loading = HfDeepSpeedConfig(ds_config) if self.config.learner.zero_stage == 3 else None
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            dtype=self.dtype,
            attn_implementation="sdpa",
            trust_remote_code=self.config.model.trust_remote_code,
        )
        del zero3_loading
        model.config.use_cache = False
        return model

    def _load_model(self, ds_config: dict[str, Any]):
        model = self._from_pretrained(ds_config)
        if self.config.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model

    def _load_reference_model(self, ds_config: dict[str, Any]):
        """A frozen copy of the initial policy for the KL term; under ZeRO-3 partitioned across the
        ranks like the policy (its forwards are then collective, as every rank runs the same ones)."""
        eval_config = {
            key: ds_config[key] for key in ("train_micro_batch_size_per_gpu", "bf16", "fp16", "steps_per_print")
        }
        eval_config["zero_optimization"] = {"stage": self.config.learner.zero_stage}
        reference = self._from_pretrained(eval_config).requires_grad_(False)
        if self.config.learner.zero_stage != 3:
            return reference.to(self.device).eval()
        engine, *_ = import_deepspeed().initialize(model=reference, config=eval_config)
        engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
        return engine

    # ------------------------------------------------------------------ training

    def _packed_logits(self, model, packed: torch.Tensor) -> torch.Tensor:
        batch = packed.shape[0]
        return model(
            input_ids=packed,
            attention_mask=self._mask.expand(batch, -1, -1, -1),
            position_ids=self._positions.expand(batch, -1),
            use_cache=False,
        ).logits

    def train_step(
        self,
        rollouts: list[RolloutBatch],
        features: list[FeatureBatch],
        current_version: int,
        *,
        capture_gradients: bool = False,
    ) -> dict[str, float]:
        """One optimizer step over this rank's documents; returns metrics averaged over all ranks.

        current_version must be the learner's weight_version: rollouts sampled from older weights are
        stale and get the truncated importance weight. With capture_gradients, the full (unclipped)
        gradient of every parameter is kept in `captured_gradients` before the optimizer step.
        """
        if current_version != self.weight_version:
            raise ValueError(
                f"current_version={current_version} but the learner holds weight version {self.weight_version}"
            )
        started = time.perf_counter()
        inputs = prepare_inputs(rollouts, features, current_version, self.config, self.plan)
        if inputs.docs.shape[0] != self.docs_per_rank:
            raise ValueError(
                f"this rank got {inputs.docs.shape[0]} documents; training.docs_per_step="
                f"{self.config.training.docs_per_step} over {self.world_size} ranks needs {self.docs_per_rank}"
            )
        temperature, loss_cfg = self.config.sampling.temperature, self.config.loss
        sums: dict[str, float] = {}
        weight_max, tokens = 0.0, 0
        self.engine.train()
        for micro in range(self.accumulation_steps):
            docs = slice(micro * self.micro_batch_docs, (micro + 1) * self.micro_batch_docs)
            packed = self.plan.pack(inputs.docs[docs], inputs.rollouts[docs]).to(self.device)  # [docs, S]
            logits = self._packed_logits(self.engine, packed)
            # Per (document, sample) sequence, in (doc, sample) order: log-probs [B, NB, G], CE [B].
            logprobs = generated_logprobs(logits, packed, self.plan, temperature).flatten(0, 1)
            ce = document_nll(logits, packed[:, : self.plan.chunk_length]).repeat_interleave(self.samples)
            del logits
            ref_logprobs = None
            if self.reference_model is not None:
                with torch.no_grad():
                    ref_logits = self._packed_logits(self.reference_model, packed)
                    ref_logprobs = generated_logprobs(ref_logits, packed, self.plan, temperature).flatten(0, 1)
            terms = ebft_loss(
                logprobs,
                inputs.advantages[docs].flatten(0, 1).to(self.device),
                ce,
                rl_coef=loss_cfg.rl_coef,
                ce_coef=loss_cfg.ce_coef,
                kl_coef=loss_cfg.kl_coef,
                behavior_logprobs=inputs.behavior_logprobs[docs].flatten(0, 1).to(self.device),
                stale=inputs.stale[docs].repeat_interleave(self.samples).to(self.device),
                ratio_truncation=loss_cfg.ratio_truncation,
                ref_logprobs=ref_logprobs,
            )
            self.engine.backward(terms.loss)
            if micro == self.accumulation_steps - 1:
                self._before_optimizer_step(capture_gradients)
            self.engine.step()
            for name in ("loss", "policy_loss", "ce_loss", "kl", "importance_weight_mean", "truncated_fraction"):
                sums[name] = sums.get(name, 0.0) + float(getattr(terms, name).detach())
            weight_max = max(weight_max, float(terms.importance_weight_max))
            tokens += packed.numel()

        self.step += 1
        self.weight_version += 1
        metrics = {name: value / self.accumulation_steps for name, value in sums.items()}
        metrics.update(
            gt_reward=float(inputs.alignment.mean()),
            diversity_reward=float(inputs.diversity.mean()),
            reward=float(inputs.rewards.mean()),
            cfm=float(inputs.cfm.mean()),
            stale_fraction=float(inputs.stale.float().mean()),
        )
        metrics = self._mean_over_ranks(metrics)
        metrics["advantage_std"] = self._std_over_ranks(inputs.advantages)
        metrics["importance_weight_max"] = self._max_over_ranks(weight_max)
        metrics["grad_norm"] = self._grad_norm
        metrics["lr"] = self._last_lr
        elapsed = time.perf_counter() - started
        metrics.update(
            tokens_per_s=self._sum_over_ranks(tokens) / elapsed,
            step_time_s=elapsed,
            step=self.step,
            weight_version=self.weight_version,
        )
        return {f"{METRIC_PREFIX}{name}": float(value) for name, value in metrics.items()}

    def sft_step(self, chunks: Sequence[ChunkBatch], current_version: int) -> dict[str, float]:
        """One optimizer step of token-mean cross-entropy on this rank's documents (training.method = sft):
        the same micro-batches, accumulation, clipping and schedule as `train_step`, no rollouts."""
        if current_version != self.weight_version:
            raise ValueError(
                f"current_version={current_version} but the learner holds weight version {self.weight_version}"
            )
        started = time.perf_counter()
        docs = torch.cat([torch.as_tensor(c.tokens) for c in chunks]).long()
        if docs.shape != (self.docs_per_rank, self.plan.chunk_length):
            raise ValueError(
                f"this rank got documents {tuple(docs.shape)}; "
                f"training.docs_per_step={self.config.training.docs_per_step} "
                f"over {self.world_size} ranks needs [{self.docs_per_rank}, {self.plan.chunk_length}]"
            )
        ce_sum = 0.0
        self.engine.train()
        for micro in range(self.accumulation_steps):
            batch = docs[micro * self.micro_batch_docs : (micro + 1) * self.micro_batch_docs].to(self.device)
            loss = document_nll(self.engine(input_ids=batch, use_cache=False).logits, batch).mean()
            self.engine.backward(loss)
            if micro == self.accumulation_steps - 1:
                self._before_optimizer_step(False)
            self.engine.step()
            ce_sum += float(loss.detach())
        self.step += 1
        self.weight_version += 1
        ce = ce_sum / self.accumulation_steps
        metrics = self._mean_over_ranks({"loss": ce, "ce_loss": ce})
        elapsed = time.perf_counter() - started
        metrics.update(
            grad_norm=self._grad_norm,
            lr=self._last_lr,
            tokens_per_s=self._sum_over_ranks(docs.numel()) / elapsed,
            step_time_s=elapsed,
            step=self.step,
            weight_version=self.weight_version,
        )
        return {f"{METRIC_PREFIX}{name}": float(value) for name, value in metrics.items()}

    def _before_optimizer_step(self, capture: bool) -> None:
        """At the accumulation boundary, after the last backward: read what the step will use."""
        from deepspeed.utils import safe_get_full_grad

        self._last_lr = float(self.optimizer.param_groups[0]["lr"])
        grads = None
        if capture or self.engine.zero_optimization_stage() == 0 and self.dtype == torch.float32:
            # safe_get_full_grad is collective under ZeRO 1-3: every rank calls it for every parameter.
            grads = {
                name: safe_get_full_grad(p) for name, p in self.engine.module.named_parameters() if p.requires_grad
            }
        self.captured_gradients = {k: v.detach().float().cpu().clone() for k, v in grads.items()} if capture else None
        self._grad_norm_fallback = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()])))
            if grads
            else None
        )

    @property
    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # ZeRO-0 fp32 with a torch optimizer: DeepSpeed clips without recording the norm
            norm = self._grad_norm_fallback
        return float(norm) if norm is not None else float("nan")

    def _all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size == 1:
            return values
        values = values.to(self.device)
        dist.all_reduce(values, op=op)
        return values.cpu()

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        names = list(metrics)
        totals = self._all_reduce(torch.tensor([metrics[n] for n in names], dtype=torch.float64)) / self.world_size
        return dict(zip(names, totals.tolist()))

    def _std_over_ranks(self, values: torch.Tensor) -> float:
        v = values.double().flatten()
        count, total, squares = self._all_reduce(
            torch.stack([v.new_tensor(v.numel()), v.sum(), v.square().sum()])
        ).tolist()
        mean = total / count
        return math.sqrt(max(squares / count - mean * mean, 0.0) * count / max(count - 1, 1))

    def _max_over_ranks(self, value: float) -> float:
        return float(self._all_reduce(torch.tensor([value], dtype=torch.float64), op=dist.ReduceOp.MAX))

    def _sum_over_ranks(self, value: float) -> float:
        return float(self._all_reduce(torch.tensor([value], dtype=torch.float64)))

    # ------------------------------------------------------------------ weights

    def full_state_dict(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
        """The policy's parameters and persistent buffers with HF names on rank 0 (None elsewhere).

        Collective under ZeRO-3 (partitions are gathered one module at a time, copied out on rank 0).
        Otherwise tensors already on `device` are the live parameters, not copies: use them before the
        next step. Tied weights appear once, under their first name, as in HF checkpoints.
        """
        module = self.engine.module
        zero3 = self.config.learner.zero_stage == 3
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for prefix, sub in module.named_modules():
            own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for _, p in own)
            if zero3 and own:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
                    if self.rank == 0:
                        state.update({_join(prefix, n): p.detach().to(device, copy=True) for n, p in own})
            elif self.rank == 0:
                state.update({_join(prefix, n): p.detach().to(device) for n, p in own})
            if self.rank == 0:
                persistent = [
                    n for n, _ in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set
                ]
                state.update({_join(prefix, n): getattr(sub, n).detach().to(device) for n in persistent})
        return state if self.rank == 0 else None

    def export_weights(self) -> WeightUpdate | None:
        """The current weights as safetensors bytes tagged with weight_version (rank 0; None elsewhere)."""
        state = self.full_state_dict()
        return None if state is None else weight_transport.state_dict_to_update(state, self.weight_version)

    def connect_weight_receivers(self, rollout_actors: Sequence[Any]) -> None:
        """Rank 0: open the configured transport (object store or NCCL) to the rollout actors."""
        if self.rank != 0:
            return
        options = {}
        if weight_transport.choose_transport(self.config) == weight_transport.NCCL:
            import ray

            options = {"master_address": ray.util.get_node_ip_address(), "master_port": free_port()}
        self.weight_sender = weight_transport.make_weight_sender(self.config, rollout_actors, **options)
        self.weight_sender.connect()

    def push_weights(self) -> int | None:
        """Send the current weights, as weight_version, to the connected rollout actors; all ranks call it.

        Returns (rank 0) the version every actor reports. NCCL broadcasts from device memory; the
        object store gets one safetensors copy that every actor reads.
        """
        nccl = weight_transport.choose_transport(self.config) == weight_transport.NCCL
        state = self.full_state_dict(self.device if nccl else "cpu")
        if self.rank != 0:
            return None
        if self.weight_sender is None:
            raise RuntimeError("call connect_weight_receivers(rollout_actors) before push_weights()")
        return self.weight_sender.send(state, self.weight_version)

    @torch.no_grad()
    def document_ce(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Teacher-forced token-mean NLL [docs] of whole chunks [docs, T] under the current policy (rank 0)."""
        zero3 = self.config.learner.zero_stage == 3
        if self.rank != 0 and not zero3:
            return None
        module, batch, out = self.engine.module, self.micro_batch_docs * self.samples, []
        module.eval()
        try:
            for start in range(0, tokens.shape[0], batch):  # ZeRO-3: every rank runs the same forwards
                chunk = torch.as_tensor(tokens[start : start + batch]).long().to(self.device)
                out.append(document_nll(module(input_ids=chunk, use_cache=False).logits, chunk).float().cpu())
        finally:
            module.train()
        return torch.cat(out) if self.rank == 0 else None

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict[str, Any] | None = None) -> Path:
        """Write a complete checkpoint to `path` atomically, then keep the last checkpoint.keep_last beside it."""
        final = Path(path)
        temporary = ckpt.temporary_path(final)
        if self.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        dist.barrier()
        state = self.full_state_dict()
        if self.rank == 0:
            module = self.engine.module
            ckpt.save_policy(
                temporary, state, module.config, getattr(module, "generation_config", None), self.model_path
            )
        self.engine.save_checkpoint(str(temporary / ckpt.DEEPSPEED_DIR), tag=ckpt.DEEPSPEED_TAG, save_latest=False)
        torch.save(ckpt.capture_rng_state(), ckpt.rng_file(temporary, self.rank))
        dist.barrier()
        if self.rank == 0:
            ckpt.write_trainer_state(
                temporary,
                step=self.step,
                weight_version=self.weight_version,
                world_size=self.world_size,
                extra_state=extra_state or {},
            )
            ckpt.publish(temporary, final)
            ckpt.prune_checkpoints(final.parent, self.config.checkpoint.keep_last)
        dist.barrier()
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler, step, weight version and RNG; returns the extra state."""
        path = Path(path)
        if not ckpt.is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {ckpt.TRAINER_STATE})")
        trainer_state = ckpt.read_trainer_state(path)
        if trainer_state["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {trainer_state['world_size']} learner ranks; this group has "
                f"{self.world_size} (ZeRO partitions are per rank): resume with the same resources.learner.num_actors"
            )
        loaded, _ = self.engine.load_checkpoint(
            str(path / ckpt.DEEPSPEED_DIR),
            tag=ckpt.DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the optimizer state under {path / ckpt.DEEPSPEED_DIR}")
        self.step, self.weight_version = trainer_state["step"], trainer_state["weight_version"]
        rng = ckpt.rng_file(path, self.rank)
        if rng.is_file():
            ckpt.restore_rng_state(torch.load(rng, weights_only=False))
        return ckpt.read_extra_state(path)

    def close(self) -> None:
        """Release the engine (the process group stays: it belongs to the process)."""
        if self.weight_sender is not None:
            self.weight_sender.close()
        self.engine = self.optimizer = self.scheduler = self.reference_model = self.weight_sender = None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
