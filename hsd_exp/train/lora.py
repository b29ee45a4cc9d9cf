"""LoRA adapters (peft) on a causal LM. Target modules default to every linear layer of the decoder layers'
attention and MLP, found on the model (hsd_exp.families: ``Family.lora_targets``, peft's name suffixes)."""

from __future__ import annotations

import torch

from hsd_exp.errors import ConfigError
from hsd_exp.families import family_of


def apply_lora(model, lora: dict):
    """``model`` wrapped in a peft LoRA adapter as ``finetune.lora`` describes (r, alpha, dropout, target_modules;
    target_modules null = every linear of attention and MLP)."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.get("target_modules") or family_of(model).lora_targets)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:  # before peft touches the model
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ConfigError(f"finetune.lora.target_modules: {', '.join(missing)} not found in the model; "
                          f"its linear modules are: {', '.join(linear)}")
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)
