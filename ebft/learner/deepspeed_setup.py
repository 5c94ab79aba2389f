"""What a learner rank needs before its first step: the process group, DeepSpeed for this machine, its
config, the optimizer and LR schedule, and the policy (plus the frozen reference) loaded for ZeRO."""

from __future__ import annotations

import importlib
import math
import os
import socket
from datetime import timedelta
from typing import Any

import torch

from ebft import packed_attention
from ebft.config import Config, batch_geometry


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def import_deepspeed(on_gpu: bool):
    """Import DeepSpeed for the learner pool's device (resources.learner, not what torch can see): on CPU its CPU
    accelerator, without the shared-memory comm op, whose JIT build costs ~30 s per process and only speeds up
    large intra-node all-reduces."""
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"
    import deepspeed

    if not on_gpu:
        # `import deepspeed.comm.torch as m` would bind the torch package (a name clash); fetch the module.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def join_process_group(
    rank: int,
    world_size: int,
    device: torch.device,
    master_addr: str,
    master_port: int | None,
    timeout: timedelta = timedelta(minutes=30),
) -> None:
    """Set the rendezvous variables and join the gloo (CPU) or NCCL (GPU `device`) group, whose collectives fail
    past `timeout` (collective_timeout). DeepSpeed's engine takes its GPU from LOCAL_RANK, so on a GPU it is the
    device's index."""
    on_gpu = device.type == "cuda"
    local_rank = device.index if on_gpu else rank
    for key, value in {
        "RANK": rank,
        "WORLD_SIZE": world_size,
        "LOCAL_RANK": local_rank,
        "MASTER_ADDR": master_addr,
    }.items():
        os.environ[key] = str(value)
    if master_port is not None or "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(master_port or free_port())
    deepspeed = import_deepspeed(on_gpu)
    from deepspeed.accelerator import get_accelerator

    if on_gpu:
        get_accelerator().set_device(local_rank)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != world_size:
        raise RuntimeError(
            f"this process already joined a process group of size {torch.distributed.get_world_size()}, "
            f"not {world_size}"
        )
    if not torch.distributed.is_initialized():
        # A world destroyed by someone else (an in-process vLLM engine shutting down) leaves DeepSpeed's
        # cached groups pointing at it; DeepSpeed's own destroy_process_group would have released them.
        from deepspeed.utils import groups

        groups._release_process_group_references()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False, timeout=timeout)


def collective_timeout(config: Config) -> timedelta:
    """The learner ranks' collective bound. Under ZeRO-3 ranks 1..k enter a push's first all-gather at once while
    rank 0 may wait up to rollout.weight_sync_timeout_s for the engines to enter the round: DeepSpeed's default of 10
    minutes would let its watchdog end the learner first (the default bound is 600 s too)."""
    return timedelta(seconds=max(30 * 60, 2 * config.rollout.weight_sync_timeout_s + 10 * 60))


def warmup_steps(config: Config) -> int:
    return math.ceil(config.optim.warmup_fraction * config.training.steps)


def lr_factor(step_index: int, config: Config) -> float:
    """LR multiplier of optimizer step step_index (0-based): (i + 1) / warmup over the warmup steps, then 1
    (optim.schedule constant) or a half cosine that reaches optim.min_lr_fraction at the last training step."""
    warmup, steps, optim = warmup_steps(config), config.training.steps, config.optim
    # Step i trains at the schedule's value after i + 1 scheduler steps: the warmup's last step is at the peak.
    done = step_index + 1
    if done < warmup:
        return done / warmup
    if optim.schedule == "constant" or steps <= warmup:
        return 1.0
    progress = min(1.0, (done - warmup) / (steps - warmup))
    floor = optim.min_lr_fraction
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(config: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """One micro-batch is micro_batch_docs documents x n sequences; DeepSpeed averages over them all."""
    learner, samples = config.learner, config.sampling.num_samples
    _, accumulation_steps = batch_geometry(config, world_size)
    zero: dict[str, Any] = {"stage": learner.zero_stage}
    if learner.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    ds_config = {
        "train_micro_batch_size_per_gpu": learner.micro_batch_docs * samples,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": learner.micro_batch_docs * samples * accumulation_steps * world_size,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": config.model.dtype == "bfloat16"},
        "fp16": {"enabled": config.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if config.model.dtype == "bfloat16":
        # Else DeepSpeed sums the micro-batches' gradients in bf16: over 16 micro-batches of a tiny model the step's
        # gradient was 7.35e-3 (relative) from a float64 reference, against 6.54e-3 in fp32 (ZeRO-2; 1 and 3 alike).
        ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
    if learner.offload_optimizer and on_gpu:
        o = config.optim
        ds_config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay},
        }
    return ds_config


def from_pretrained(config: Config, model_path: str, ds_config: dict[str, Any]):
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # Under ZeRO-3 this object must be alive during from_pretrained: each rank then loads only its partition.
    zero3_loading = HfDeepSpeedConfig(ds_config) if config.learner.zero_stage == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=getattr(torch, config.model.dtype),
        attn_implementation=packed_attention.register() if config.learner.attention == "blocks" else "sdpa",
        trust_remote_code=config.model.trust_remote_code,
    )
    del zero3_loading
    model.config.use_cache = False
    return model


def policy_engine(config: Config, model_path: str, ds_config: dict[str, Any], on_gpu: bool):
    """(engine, optimizer, scheduler): the trainable policy wrapped by DeepSpeed, AdamW with lr_factor's schedule. With
    model.lora the policy is a PEFT model whose adapters alone train (lora.py)."""
    model = from_pretrained(config, model_path, ds_config)
    if config.learner.gradient_checkpointing:
        # Non-reentrant: with LoRA the checkpointed layers' inputs need no grad for their adapters to get one.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.model.lora is not None:
        from ebft.learner.lora import add_adapters

        model = add_adapters(model, config.model.lora, seed=config.training.seed)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters
    optimizer = None
    if not (config.learner.offload_optimizer and on_gpu):
        # On CPU a torch AdamW avoids DeepSpeed's JIT-built Adam; on GPU with offload DeepSpeed
        # builds its CPU Adam from the "optimizer" section instead.
        o = config.optim
        # fused: one kernel over ZeRO's flat fp32 partition, where the default allocates several
        # partition-sized temporaries per step (each a fresh mmap on CPU: ~1 s of page faults at 135M).
        optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True)
    engine, optimizer, _, scheduler = import_deepspeed(on_gpu).initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, config)),
    )
    return engine, optimizer, scheduler


def reference_model(config: Config, model_path: str, ds_config: dict[str, Any], device: torch.device):
    """A frozen copy of the initial policy for the KL term; under ZeRO-3 partitioned across the
    ranks like the policy (its forwards are then collective, as every rank runs the same ones)."""
    eval_config = {key: ds_config[key] for key in ("train_micro_batch_size_per_gpu", "bf16", "fp16", "steps_per_print")}
    eval_config["zero_optimization"] = {"stage": config.learner.zero_stage}
    reference = from_pretrained(config, model_path, eval_config).requires_grad_(False)
    if config.learner.zero_stage != 3:
        return reference.to(device).eval()
    engine, *_ = import_deepspeed(device.type == "cuda").initialize(model=reference, config=eval_config)
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine
