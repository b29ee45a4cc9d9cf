"""The family table: every row names real modules on its tiny model (layers, final norm, LM head, LoRA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsd_exp.families import FAMILIES, MODEL_TYPES, decoder_layers, family_of, submodule


def test_every_family_has_a_model_type():
    assert set(MODEL_TYPES.values()) == set(FAMILIES)
    assert all(fam.name == key for key, fam in FAMILIES.items())


def test_family_rows_resolve_on_their_tiny_model(tiny):
    fam = family_of(tiny.model)
    assert fam is FAMILIES[tiny.family]
    layers = decoder_layers(tiny.model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == tiny.num_layers
    assert submodule(tiny.model, fam.stack).get_submodule(fam.layers.removeprefix(fam.stack + ".")) is layers
    for layer in layers:
        assert isinstance(getattr(layer, fam.attn), nn.Module)
        assert isinstance(getattr(layer, fam.attn_norm), nn.Module)
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

    names = [n for n, _ in tiny.model.named_modules()]
    for target in fam.lora_targets:  # each LoRA suffix adapts something in every layer
        hits = [n for n in names if n.endswith("." + target)]
        assert len(hits) >= tiny.num_layers, f"{tiny.family}: LoRA target {target} matches {hits}"


def test_unknown_model_type_names_the_table():
    class Fake(nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(ValueError, match="mamba.*hsd_exp/families.py"):
        family_of(Fake())
