"""Whether `model.lora.target_modules` names linear layers of the policy: checked before a run starts (from the
policy's config alone) and by the learner when it adds the adapters. Below the pools: it imports neither."""

from __future__ import annotations

import torch

from ebft.config import ConfigError, LoraConfig


def check_target_modules(model: torch.nn.Module, lora: LoraConfig) -> None:
    """A ConfigError unless each of `model.lora.target_modules` names (as PEFT matches names: the full module name or
    a dotted suffix) one or more of the model's linear layers and nothing else."""
    modules = dict(model.named_modules())
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, torch.nn.Linear)})
    output = model.get_output_embeddings()
    tied_output = output if output is not None and output.weight is model.get_input_embeddings().weight else None
    for target in lora.target_modules:
        matched = [m for name, m in modules.items() if name == target or name.endswith(f".{target}")]
        if not matched or not all(isinstance(m, torch.nn.Linear) for m in matched):
            kind = "no layer" if not matched else "a layer that is not linear"
            raise ConfigError(
                f"model.lora.target_modules: `{target}` matches {kind} of {type(model).__name__}; its linear layers "
                f"are named {', '.join(linear_names)} (e.g. model.lora.target_modules=[q_proj,v_proj])"
            )
        if tied_output is not None and any(m is tied_output for m in matched):
            raise ConfigError(
                f"model.lora.target_modules: `{target}` is the output layer, which this model ties to its input "
                "embedding: a merged update of one would change the other; adapt the other linear layers"
            )


def check_policy_targets(policy_path: str, lora: LoraConfig, *, trust_remote_code: bool) -> None:
    """check_target_modules on the policy built from its config on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    check_target_modules(model, lora)
