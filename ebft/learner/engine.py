"""One DeepSpeed rank of the learner, usable in-process (tests) or inside a Ray actor (group.py): it trains.

An EBFT step takes this rank's share of the step's documents (rollouts + pooled features), turns
features into per-block advantages (batches.py), and runs one packed forward per document (the
document once, then its n samples of every block; ebft/layout.py) in micro-batches of
`learner.micro_batch_docs` documents. An SFT step runs plain cross-entropy over the same micro-batches; an
RLVR step packs each question with its n completions (ebft/rlvr/loss.py).
Each micro-batch loss is a mean over its sequences; DeepSpeed divides by the accumulation steps and
averages over ranks, so the accumulated gradient is the gradient of the full-batch loss. Every
micro-batch therefore has the same size and every rank the same number of documents.

Set-up (process group, DeepSpeed config, model loading) is in deepspeed_setup.py; metric reductions
over ranks in collectives.py; the gathered state dict in state_dict.py; checkpoint layout in checkpoint.py; LoRA
adapters (model.lora), exported merged, in lora.py.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ebft.actor_resources import actor_device
from ebft.config import Config, batch_geometry
from ebft.layout import BlockPlan
from ebft.learner import checkpoint as ckpt
from ebft.learner.batches import prepare_inputs
from ebft.learner.collectives import RankReduce
from ebft.learner.deepspeed_setup import (
    collective_timeout,
    deepspeed_config,
    join_process_group,
    policy_engine,
    reference_model,
)
from ebft.learner.ema import PolicyAverage
from ebft.learner.lora import adapter_metadata, adapter_state_dict, adapter_tensors, save_adapter, transformers_model
from ebft.learner.loss import chunks_document_ce, document_ce, ebft_loss, generated_logprobs
from ebft.learner.state_dict import gather_state_dict, iter_state_dict, state_dict_metadata
from ebft.learner.weight_sender import WeightStream
from ebft.messages import ChunkBatch, CompletionBatch, FeatureBatch, RewardBatch, RolloutBatch
from ebft.rlvr.advantages import leave_one_out_advantages
from ebft.rlvr.loss import completion_logprobs, pack_prompt_groups, rlvr_loss

METRIC_PREFIX = "train/"
EBFT_LOSS_TERMS = ("loss", "policy_loss", "ce_loss", "kl", "importance_weight_mean", "truncated_fraction")


class LearnerRank:
    """A DeepSpeed rank holding the policy, its optimizer and LR schedule.

    All ranks must call train_step, sft_step, full_state_dict, save_checkpoint and load_checkpoint together
    (they are collective). For world_size 1 in-process, the rendezvous variables are set here.
    """

    def __init__(
        self,
        config: Config,
        model_path: str | os.PathLike,
        *,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
    ):
        self.config, self.model_path = config, str(model_path)
        self.rank, self.world_size = rank, world_size
        self.samples = config.sampling.num_samples
        self.plan = replace(BlockPlan.from_config(config), samples=self.samples)
        self.micro_batch_docs = config.learner.micro_batch_docs
        self.docs_per_rank, self.accumulation_steps = batch_geometry(config, world_size)
        self.dtype = getattr(torch, config.model.dtype)
        self.uses_lora = config.model.lora is not None
        if config.learner.offload_optimizer and config.learner.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage >= 1")

        self.device = actor_device(config.resources.learner)
        join_process_group(rank, world_size, self.device, master_addr, master_port, collective_timeout(config))
        on_gpu = self.device.type != "cpu"
        ds_config = deepspeed_config(config, world_size, on_gpu)
        self.engine, self.optimizer, self.scheduler = policy_engine(config, self.model_path, ds_config, on_gpu)
        self.reference_model = (
            reference_model(config, self.model_path, ds_config, self.device) if config.loss.kl_coef > 0 else None
        )
        self.reduce = RankReduce(world_size, self.device)
        zero3 = config.learner.zero_stage == 3
        self.ema = (
            PolicyAverage(self.engine.module, config.training.ema, zero3=zero3, rank=rank)
            if config.training.ema is not None
            else None
        )
        self.step = 0
        self.weight_version = 0
        self._last_lr = float("nan")
        self._grad_norm_fallback: float | None = None
        self._positions = self.plan.position_ids.to(self.device)
        # How the packed rows attend (learner.attention): the plan itself, or the dense [1, 1, S, S] mask.
        if config.learner.attention == "blocks":
            self._attention = {"block_plan": self.plan}
        else:
            self._attention = {"attention_mask": self.plan.attention_mask(self.dtype).to(self.device)}

    # ------------------------------------------------------------------ training

    def _packed_logits(self, model, packed: torch.Tensor) -> torch.Tensor:
        positions = self._positions.expand(packed.shape[0], -1)
        return model(input_ids=packed, position_ids=positions, use_cache=False, **self._attention).logits

    def train_step(
        self,
        rollouts: list[RolloutBatch],
        features: list[FeatureBatch],
        current_version: int,
    ) -> dict[str, float]:
        """One EBFT optimizer step over this rank's documents; returns metrics averaged over all ranks.

        current_version must be the learner's weight_version: rollouts sampled from older weights are
        stale and get the truncated importance weight.
        """
        self._check_version(current_version)
        started = time.perf_counter()
        inputs = prepare_inputs(rollouts, features, current_version, self.config, self.plan)
        if inputs.docs.shape[0] != self.docs_per_rank:
            raise ValueError(
                f"this rank got {inputs.docs.shape[0]} documents; training.docs_per_step="
                f"{self.config.training.docs_per_step} over {self.world_size} ranks needs {self.docs_per_rank}"
            )
        temperature, loss_cfg = self.config.sampling.temperature, self.config.loss
        weight_max = 0.0

        def micro_loss(docs: slice):
            nonlocal weight_max
            packed = self.plan.pack(inputs.docs[docs], inputs.rollouts[docs]).to(self.device)  # [docs, S]
            logits = self._packed_logits(self.engine, packed)
            # Per (document, sample) sequence, in (doc, sample) order: log-probs [B, NB, G], CE [B].
            logprobs = generated_logprobs(logits, packed, self.plan, temperature).flatten(0, 1)
            ce = document_ce(logits, packed[:, : self.plan.chunk_length]).repeat_interleave(self.samples)
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
            weight_max = max(weight_max, float(terms.importance_weight_max))
            return terms.loss, {name: float(getattr(terms, name).detach()) for name in EBFT_LOSS_TERMS}

        metrics = self._accumulate(micro_loss)
        metrics.update(
            gt_reward=float(inputs.alignment.mean()),
            diversity_reward=float(inputs.diversity.mean()),
            reward=float(inputs.rewards.mean()),
            cfm=float(inputs.cfm.mean()),
            stale_fraction=float(inputs.stale.float().mean()),
        )
        metrics = self.reduce.mean(metrics)
        metrics["advantage_std"] = self.reduce.std(inputs.advantages)
        metrics["importance_weight_max"] = self.reduce.max(weight_max)
        return self._step_metrics(metrics, self.docs_per_rank * self.plan.packed_length, started)

    def sft_step(self, chunks: Sequence[ChunkBatch], current_version: int) -> dict[str, float]:
        """One optimizer step of token-mean cross-entropy on this rank's documents (training.method = sft):
        the same micro-batches, accumulation, clipping and schedule as `train_step`, no rollouts."""
        self._check_version(current_version)
        started = time.perf_counter()
        docs = torch.cat([torch.as_tensor(c.tokens) for c in chunks]).long()
        if docs.shape != (self.docs_per_rank, self.plan.chunk_length):
            raise ValueError(
                f"this rank got documents {tuple(docs.shape)}; "
                f"training.docs_per_step={self.config.training.docs_per_step} "
                f"over {self.world_size} ranks needs [{self.docs_per_rank}, {self.plan.chunk_length}]"
            )

        def micro_loss(micro_docs: slice):
            batch = docs[micro_docs].to(self.device)
            loss = document_ce(self.engine(input_ids=batch, use_cache=False).logits, batch).mean()
            return loss, {"loss": float(loss.detach()), "ce_loss": float(loss.detach())}

        metrics = self.reduce.mean(self._accumulate(micro_loss))
        return self._step_metrics(metrics, docs.numel(), started)

    def rlvr_step(
        self, completions: Sequence[CompletionBatch], rewards: Sequence[RewardBatch], current_version: int
    ) -> dict[str, float]:
        """One RLVR optimizer step over this rank's questions (training.method = rlvr, docs/method.md section 10):
        leave-one-out advantages of each question's n rewards, then each question packed once with its n
        completions in micro-batches of learner.micro_batch_docs questions."""
        self._check_version(current_version)
        started = time.perf_counter()
        prompts = [prompt for batch in completions for prompt in batch.prompts.prompts]
        groups = [group for batch in completions for group in batch.tokens]
        behavior = [group for batch in completions for group in batch.behavior_logprobs]
        stale = torch.tensor([b.weight_version != current_version for b in completions for _ in b.prompts.task_ids])
        if [r.task_ids for r in rewards] != [b.prompts.task_ids for b in completions]:
            raise ValueError("the rewards are not those of these completions (their question ids differ)")
        if len(prompts) != self.docs_per_rank:
            raise ValueError(
                f"this rank got {len(prompts)} questions; training.docs_per_step={self.config.training.docs_per_step}"
                f" over {self.world_size} ranks needs {self.docs_per_rank}"
            )
        reward = torch.cat([r.rewards for r in rewards])
        rlvr, temperature, loss_cfg = self.config.rlvr, self.config.sampling.temperature, self.config.loss
        grouped = leave_one_out_advantages(reward, rlvr.divide_by_std, rlvr.std_eps)
        weight_max = 0.0

        def micro_loss(docs: slice):
            nonlocal weight_max
            packed = pack_prompt_groups(prompts[docs], groups[docs])
            inputs = {
                "input_ids": packed.tokens.to(self.device),
                "position_ids": packed.position_ids.to(self.device),
                "attention_mask": packed.attention_mask(self.dtype).to(self.device),
                "use_cache": False,
            }
            logprobs = completion_logprobs(self.engine(**inputs).logits, packed, temperature)
            ref_logprobs = None
            if self.reference_model is not None:
                with torch.no_grad():
                    ref_logprobs = completion_logprobs(self.reference_model(**inputs).logits, packed, temperature)
            n = packed.completions_per_prompt
            terms = rlvr_loss(
                logprobs,
                grouped.advantages[docs].to(self.device),
                packed,
                kl_coef=loss_cfg.kl_coef,
                behavior_logprobs=packed.per_target(behavior[docs]).to(self.device),
                stale=stale[docs, None].expand(-1, n),
                ratio_truncation=loss_cfg.ratio_truncation,
                ref_logprobs=ref_logprobs,
            )
            weight_max = max(weight_max, float(terms.importance_weight_max))
            return terms.loss, {name: float(getattr(terms, name).detach()) for name in EBFT_LOSS_TERMS}

        metrics = self._accumulate(micro_loss)
        lengths = [len(completion) for group in groups for completion in group]
        metrics.update(
            reward=float(reward.mean()),
            equal_reward_fraction=grouped.equal_groups / len(prompts),
            completion_tokens=sum(lengths) / len(lengths),
            stale_fraction=float(stale.float().mean()),
        )
        metrics = self.reduce.mean(metrics)
        metrics["advantage_std"] = self.reduce.std(grouped.advantages)
        metrics["importance_weight_max"] = self.reduce.max(weight_max)
        return self._step_metrics(metrics, sum(lengths) + sum(map(len, prompts)), started)

    def _check_version(self, current_version: int) -> None:
        if current_version != self.weight_version:
            raise ValueError(
                f"current_version={current_version} but the learner holds weight version {self.weight_version}"
            )

    def _accumulate(self, micro_loss) -> dict[str, float]:
        """One optimizer step: backward through micro_loss(docs) -> (loss, values) for each micro-batch of
        this rank's documents (DeepSpeed divides by the accumulation steps), then the update.
        Returns the values' means over the micro-batches."""
        sums: dict[str, float] = {}
        self.engine.train()
        for micro in range(self.accumulation_steps):
            docs = slice(micro * self.micro_batch_docs, (micro + 1) * self.micro_batch_docs)
            loss, values = micro_loss(docs)
            self.engine.backward(loss)
            if micro == self.accumulation_steps - 1:
                self._before_optimizer_step()
            self.engine.step()
            if micro == self.accumulation_steps - 1 and self.ema is not None:
                self.ema.update()
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
        self.step += 1
        self.weight_version += 1
        return {name: value / self.accumulation_steps for name, value in sums.items()}

    def _step_metrics(self, metrics: dict[str, float], tokens: int, started: float) -> dict[str, float]:
        elapsed = time.perf_counter() - started
        metrics.update(
            grad_norm=self._grad_norm,
            lr=self._last_lr,
            tokens_per_s=self.reduce.sum(tokens) / elapsed,
            step_time_s=elapsed,
            step=self.step,
            weight_version=self.weight_version,
        )
        return {f"{METRIC_PREFIX}{name}": float(value) for name, value in metrics.items()}

    def _before_optimizer_step(self) -> None:
        """At the accumulation boundary, after the last backward: read what the step will use."""
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])
        self._grad_norm_fallback = None
        if self.engine.zero_optimization_stage() == 0 and self.dtype == torch.float32:
            grads = [p.grad for p in self.engine.module.parameters() if p.requires_grad and p.grad is not None]
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            self._grad_norm_fallback = float(torch.linalg.vector_norm(norms))

    @property
    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # ZeRO-0 fp32 with a torch optimizer: DeepSpeed clips without recording the norm
            norm = self._grad_norm_fallback
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ weights

    def full_state_dict(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
        """HF-named weights on rank 0, None elsewhere (collective under ZeRO-3; see state_dict.py); with LoRA the
        base with the adapters merged."""
        zero3 = self.config.learner.zero_stage == 3
        return gather_state_dict(self.engine.module, zero3=zero3, rank=self.rank, device=device)

    def stream_weights(self, device: torch.device | str = "cpu") -> WeightStream:
        """HF-named weights streamed one module at a time on rank 0, nothing elsewhere (see state_dict.py), with
        their names, shapes and dtypes first; with model.lora only the adapters (lora.adapter_tensors). Collective
        under ZeRO-3: every rank must exhaust the tensors."""
        zero3 = self.config.learner.zero_stage == 3
        module = self.engine.module
        if self.uses_lora:  # only the adapters travel; each rollout worker merges them into the base
            tensors = adapter_tensors(module, zero3=zero3, rank=self.rank, device=device)
            return WeightStream(adapter_metadata(module), tensors)
        tensors = iter_state_dict(module, zero3=zero3, rank=self.rank, device=device)
        return WeightStream(state_dict_metadata(module), tensors)

    def ema_state_dict(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
        """The moving average (training.ema) as full_state_dict gives the live weights: HF names on rank 0, None
        elsewhere, collective under ZeRO-3."""
        if self.ema is None:
            raise ValueError("this learner keeps no moving average: set training.ema")
        with self.ema.swapped_in():
            state = self.full_state_dict(device)
            # Without ZeRO-3 that export holds the live parameters themselves, which the swap back overwrites.
            if state is not None and self.config.learner.zero_stage != 3:
                state = {name: tensor.clone() for name, tensor in state.items()}
        return state

    @torch.no_grad()
    def document_ce(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Teacher-forced token-mean NLL [docs] of whole chunks [docs, T] under the current policy (rank 0)."""
        zero3 = self.config.learner.zero_stage == 3
        if self.rank != 0 and not zero3:
            return None
        module = self.engine.module
        module.eval()
        try:  # ZeRO-3: every rank runs the same forwards
            losses = chunks_document_ce(module, tokens, self.micro_batch_docs * self.samples, self.device)
        finally:
            module.train()
        return losses if self.rank == 0 else None

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
        model = transformers_model(self.engine.module)
        generation_config = getattr(model, "generation_config", None)
        if self.rank == 0:
            ckpt.save_policy(temporary, state, model.config, generation_config, self.model_path)
        del state
        if self.ema is not None:
            average = self.ema_state_dict()
            if self.rank == 0:
                ckpt.save_policy(temporary / ckpt.EMA_DIR, average, model.config, generation_config, self.model_path)
            del average
            if self.ema.average:
                torch.save(self.ema.state_dict(), ckpt.ema_file(temporary, self.rank))
        if self.uses_lora:
            adapter = adapter_state_dict(self.engine.module, zero3=self.config.learner.zero_stage == 3, rank=self.rank)
            if self.rank == 0:
                save_adapter(self.engine.module, temporary / ckpt.ADAPTER_DIR, adapter)
        # With LoRA the frozen base is the policy's own model_path: DeepSpeed keeps only what trains.
        self.engine.save_checkpoint(
            str(temporary / ckpt.DEEPSPEED_DIR),
            tag=ckpt.DEEPSPEED_TAG,
            save_latest=False,
            exclude_frozen_parameters=self.uses_lora,
        )
        torch.save(ckpt.capture_rng_state(self.device), ckpt.rng_file(temporary, self.rank))
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
            load_module_strict=not self.uses_lora,  # the frozen base is not in a LoRA checkpoint
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the optimizer state under {path / ckpt.DEEPSPEED_DIR}")
        if self.ema is not None and self.ema.average:
            self.ema.load_state_dict(ckpt.load_ema_state(ckpt.ema_file(path, self.rank)))
        self.step, self.weight_version = trainer_state["step"], trainer_state["weight_version"]
        ckpt.load_rng_state(ckpt.rng_file(path, self.rank), self.device)
        return ckpt.read_extra_state(path)

    def close(self) -> None:
        """Release the engine (the process group stays: it belongs to the process)."""
        self.engine = self.optimizer = self.scheduler = self.reference_model = self.ema = None
