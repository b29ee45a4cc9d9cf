"""Families read off the model: on every tested family's tiny model the layout found names real modules (layers,
final norm, LM head, attention and MLP with their norms), and a model outside the layout is refused
with one line naming its model_type and what is missing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsd_exp.models.layout import TESTED, decoder_layers, layout_of, mlp_of, submodule

from helpers import load

KV_ROPE = {"llama", "qwen2", "qwen3", "mistral", "gemma3_text"}  # the LLaMA attention layout, full RoPE
PARALLEL = {"phi", "gpt_neox"}


@pytest.mark.parametrize("family", TESTED)
def test_the_layout_found_names_real_modules(family):
    tiny = load(f"tiny-{family}")
    fam = layout_of(tiny.model)
    assert fam.name == family == tiny.family
    layers = decoder_layers(tiny.model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == tiny.num_layers
    assert submodule(tiny.model, fam.stack).get_submodule(fam.layers.removeprefix(fam.stack + ".")) is layers
    for layer in layers:
        for name in (fam.attn, fam.attn_norm, fam.mlp_norm, fam.attn_out_norm, fam.mlp_out_norm):
            assert name is None or isinstance(getattr(layer, name), nn.Module)
        assert callable(mlp_of(layer, fam))
    assert fam.kv_rope == (family in KV_ROPE) and fam.parallel == (family in PARALLEL)
    head = submodule(tiny.model, fam.lm_head)
    assert isinstance(head, nn.Linear) and head.out_features == tiny.model.config.vocab_size

    # final_norm and lm_head are what the model itself applies last: CALM's confidence uses them on h_i
    seen = {}
    hook = submodule(tiny.model, fam.final_norm).register_forward_hook(lambda m, a, out: seen.update(out=out))
    try:
        with torch.no_grad():
            logits = tiny.model(**tiny.tokenizer(["a short prompt"], return_tensors="pt")).logits
    finally:
        hook.remove()
    torch.testing.assert_close(head(seen["out"]), logits)




def test_unknown_layout_names_the_model_type_and_what_is_missing():
    class Fake(nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(ValueError, match="mamba.*no decoder stack.*hsd_exp/models/layout.py"):
        layout_of(Fake())


def test_a_layer_without_attention_is_refused():
    from transformers import AutoModelForCausalLM, MambaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(MambaConfig(num_hidden_layers=2, hidden_size=64))
    with pytest.raises(ValueError) as err:
        layout_of(model)
    msg = str(err.value)
    assert "model_type 'mamba'" in msg and "no single attention submodule" in msg and "\n" not in msg, msg
