"""The family table: where each model family keeps its decoder stack, layers, final norm and LM head.

Everything downstream (the skip engine, LoRA targets, FLOP counts) looks modules up through this table,
so no code branches on model names. Adding a family = adding one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    name: str
    stack: str  # the decoder stack module (runs embeddings, mask, layers, final norm)
    layers: str  # nn.ModuleList of decoder layers, relative to the top-level model
    final_norm: str  # norm applied before the LM head
    lm_head: str
    attn: str  # attention submodule inside one decoder layer
    attn_norm: str  # the norm in front of the attention inside one decoder layer
    mlp: str  # the MLP inside one decoder layer
    mlp_norm: str | None  # the norm in front of the MLP; None: a parallel block (the MLP reads attn_norm's output)
    lora_targets: tuple[str, ...]  # module-name suffixes peft LoRA adapts
    kv_rope: bool = False  # LLaMA-layout attention (k_proj, v_proj, head_dim, RoPE): K/V-only writes need no more


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2",
        stack="transformer",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        attn="attn",
        attn_norm="ln_1",
        mlp="mlp",
        mlp_norm="ln_2",
        lora_targets=("c_attn", "c_proj"),
    ),
    "phi": Family(
        name="phi",
        stack="model",
        layers="model.layers",
        final_norm="model.final_layernorm",
        lm_head="lm_head",
        attn="self_attn",
        attn_norm="input_layernorm",
        mlp="mlp",
        mlp_norm=None,  # attention and MLP side by side on one normed input
        lora_targets=("q_proj", "k_proj", "v_proj", "dense"),
    ),
    "llama": Family(
        name="llama",
        stack="model",
        layers="model.layers",
        final_norm="model.norm",
        lm_head="lm_head",
        attn="self_attn",
        attn_norm="input_layernorm",
        mlp="mlp",
        mlp_norm="post_attention_layernorm",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        kv_rope=True,
    ),
}

# transformers' `config.model_type` -> family, for models loaded from a path or the Hub.
MODEL_TYPES = {"gpt2": "gpt2", "phi": "phi", "llama": "llama"}


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face causal LM (unwraps peft/Lightning wrappers first)."""
    model = unwrap(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        supported = ", ".join(sorted(MODEL_TYPES))
        raise ValueError(
            f"model_type '{model_type}' is not in the family table (supported: {supported}); "
            "add a row to hsd_exp/families.py"
        )
    return FAMILIES[MODEL_TYPES[model_type]]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (LoRA layers stay inside it)."""
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    return get_base() if callable(get_base) else model


def submodule(model: nn.Module, path: str) -> nn.Module:
    return unwrap(model).get_submodule(path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return submodule(model, family_of(model).layers)
