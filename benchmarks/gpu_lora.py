"""The LoRA check of benchmarks/gpu.py (see its docstring), also runnable on CPU (`--device cpu`): a LoRA LearnerRank
on the device against PEFT in float64, and the push's adapters merged there against the CPU's merge."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from gpu_learner import (
    GRAD_TOLERANCE,
    UPDATE_TOLERANCE,
    learner_reference,
    quiet,
    relative_error,
    save_llama,
    verdict,
)


def run_lora(device: torch.device, shape: dict) -> dict:
    """model.lora on `device` (rank 8 on every projection, ZeRO-2, bf16), in this (child) process: one step against
    PEFT + AdamW in float64 from the same bf16-rounded base (the adapters' gradients and update), then the weight
    push's adapters, streamed to the device as an NCCL push sends them, merged into the base there
    (ebft/lora_merge.py, as the receiving engine merges them) against the same merge on the CPU."""
    quiet()
    ref = learner_reference()
    from safetensors.torch import load_file

    from ebft.actors.adapter_merge import LORA_A, LORA_B
    from ebft.learner.engine import LearnerRank
    from ebft.learner.lora import adapter_state_dict
    from ebft.lora_merge import merged

    config = ref.make_config(
        model={"dtype": "bfloat16", "lora": {"rank": 8, "alpha": 16.0}},
        learner={"zero_stage": 2, "gradient_checkpointing": True},
        optim={"lr": 1e-2, "warmup_fraction": 0.0},
        resources={"learner": {"gpus_per_actor": 1 if device.type == "cuda" else 0}},
    )
    with tempfile.TemporaryDirectory() as folder:
        model_dir = save_llama(Path(folder) / "model", shape)
        batch = ref.make_batch(4, seed=0, version=0)
        learner = LearnerRank(config, model_dir)
        try:

            def trained() -> dict[str, torch.Tensor]:
                state = adapter_state_dict(learner.engine.module, zero3=False, rank=0)
                return {name: tensor.double() for name, tensor in state.items()}

            captured, start = ref.capture_gradients(learner), trained()
            model = peft_float64(ref, model_dir, config, start)
            loss, _, _ = ref.reference_loss(model, [batch], config, current_version=0)
            loss.backward()
            trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
            gradients = {name: p.grad.detach().clone() for name, p in trainable.items()}
            o = config.optim
            optimizer = torch.optim.AdamW(trainable.values(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
            ref.reference_update(model, optimizer, o.lr, o.grad_clip)
            learner.train_step([batch[0]], [batch[1]], current_version=0)
            after = trained()
            figures = {
                "lora_grad_rel": relative_error(captured, gradients),
                "lora_update_rel": relative_error(
                    {n: after[n] - start[n] for n in start}, {n: trainable[n].detach() - start[n] for n in start}
                ),
            }
            pushed = dict(learner.stream_weights(learner.device).tensors)
            base = load_file(str(model_dir / "model.safetensors"))
            scale = config.model.lora.alpha / config.model.lora.rank
            on_device, on_cpu = {}, {}
            for linear in (name.removesuffix(LORA_A) for name in pushed if name.endswith(LORA_A)):
                a, b, weight = pushed[linear + LORA_A], pushed[linear + LORA_B], base[f"{linear}.weight"].bfloat16()
                on_device[linear] = merged(weight, a, b, scale).cpu()
                on_cpu[linear] = merged(weight, a.cpu(), b.cpu(), scale)
        finally:
            learner.close()
    figures["lora_pushed_on"] = str(next(iter(pushed.values())).device)
    figures["lora_merge_rel"] = relative_error(on_device, on_cpu)
    figures["lora_pass"] = (
        figures["lora_grad_rel"] < GRAD_TOLERANCE
        and figures["lora_update_rel"] < UPDATE_TOLERANCE
        and figures["lora_merge_rel"] < 1e-3  # a few bf16 roundings apart at most (float32 sums in another order)
    )
    print(
        "LoRA bf16 on {device}, one step vs PEFT in float64: gradient rel {lora_grad_rel:.2e} (< {grad:g}), update "
        "rel {lora_update_rel:.3f} (< {update:g}); the push's adapters (on {lora_pushed_on}) merged there vs on the "
        "CPU: rel {lora_merge_rel:.1e} (< 1e-3): {verdict}".format(
            **figures,
            device=device,
            grad=GRAD_TOLERANCE,
            update=UPDATE_TOLERANCE,
            verdict=verdict(figures["lora_pass"]),
        )
    )
    return figures


def peft_float64(ref, model_dir: Path, config, adapters: dict[str, torch.Tensor]):
    """The float64 base from its bf16-rounded weights, with PEFT adapters of the run's settings set to `adapters`."""
    import peft

    lora = config.model.lora
    base = ref.float64_model(model_dir)
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).double())
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules, lora_dropout=0.0),
        autocast_adapter_dtype=False,
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(adapters[name])
    return model
