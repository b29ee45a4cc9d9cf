"""LoRA targets found on the model: with finetune.lora.target_modules null, every linear layer of the decoder
layers' attention and MLP (GPT-2's Conv1D too) is adapted, in every layer; the layout found is the same after."""

import copy

import pytest

from hsd_exp.errors import ConfigError
from hsd_exp.models.layout import decoder_layers, layout_of
from hsd_exp.train.lora import apply_lora

from helpers import load

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}


@pytest.mark.parametrize("family,expected", [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ("opt", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    ("gpt_neox", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
])
def test_default_targets_are_every_linear_of_attention_and_mlp(family, expected):
    model = copy.deepcopy(load(f"tiny-{family}").model)  # the session's model stays unwrapped
    before = layout_of(model)
    peft_model = apply_lora(model, LORA)
    adapted = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == expected
    per_layer = [sum(hasattr(m, "lora_A") for m in layer.modules()) for layer in decoder_layers(peft_model)]
    assert len(set(per_layer)) == 1 and per_layer[0] >= len(expected)  # every layer alike
    assert layout_of(peft_model) == before  # LoRA layers do not change the layout found (kv_rope included)


def test_missing_target_is_named_with_the_linear_modules():
    model = copy.deepcopy(load("tiny-llama").model)
    with pytest.raises(ConfigError, match="target_modules: nope not found.*q_proj"):
        apply_lora(model, {**LORA, "target_modules": ["q_proj", "nope"]})
