"""LoRA adapters (peft) on a causal LM. Target modules default to peft's ``"all-linear"``: every linear layer
(``nn.Linear``, GPT-2's ``Conv1D``) but the output layer (the LM head), which on a decoder-only model is every
linear of the decoder layers' attention and MLP."""

from __future__ import annotations

import torch

from hsd_exp.errors import ConfigError

ALL_LINEAR = "all-linear"  # peft's shorthand (peft.utils.INCLUDE_LINEAR_LAYERS_SHORTHAND)


def apply_lora(model, lora: dict):
    """``model`` wrapped in a peft LoRA adapter as ``finetune.lora`` describes (r, alpha, dropout, target_modules;
    target_modules null = every linear of attention and MLP)."""
    from peft import LoraConfig, get_peft_model

    targets = lora.get("target_modules")
    if targets:  # named ones: each must exist, checked before peft touches the model
        targets = list(targets)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
            raise ConfigError(f"finetune.lora.target_modules: {', '.join(missing)} not found in the model; "
                              f"its linear modules are: {', '.join(linear)}")
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=targets or ALL_LINEAR, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
