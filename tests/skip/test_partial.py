"""Part of a layer: the K/V-only write stores what the whole layer would, and a layer run for some rows gives those
rows exactly the whole layer's output (the others keep their input) while every row writes its K/V."""

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache

from hsd_exp.models.layout import decoder_layers, layout_of
from hsd_exp.skip.cache import cache_argument
from hsd_exp.skip.partial import attention_block, run_rows, write_kv_only

from helpers import PROMPTS, load

LAYER = 2  # a middle layer of the 6-layer tiny models


def float64(name):
    """A float64 copy of a tiny model (exact comparisons), with its tokenizer."""
    lm = load(name)
    return copy.deepcopy(lm.model).double(), lm.tokenizer


def decode_step_inputs(model, tokenizer):
    """What layer LAYER gets in the first cached decode step of a 3-row left-padded batch: (h, args, kwargs),
    with the cache as it stands before that layer writes."""
    layer = decoder_layers(model)[LAYER]
    enc = tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(**enc, use_cache=True, **{cache_argument(model): cache})
    captured = {}

    def grab(module, args, kwargs):
        captured["call"] = (args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs)
        raise StopIteration  # stop the forward before the layer writes

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    nxt = first.logits[:, -1:].argmax(-1)  # (B, 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        try:
            model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
        except StopIteration:
            pass
        finally:
            handle.remove()
    return layer, cache, *captured["call"]


def layer_kv(cache, idx):
    return cache.layers[idx].keys.clone(), cache.layers[idx].values.clone()


def rollback(cache, idx, kv):
    cache.layers[idx].keys, cache.layers[idx].values = kv


# LAYER is a full-attention layer in tiny Gemma-3 (its sliding layers keep only the window, so the cache does not grow)
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-phi", "tiny-llama", "tiny-qwen3", "tiny-gemma3_text",
                                  "tiny-gpt_neox", "tiny-opt"])
def test_kv_only_and_some_rows_match_the_whole_layer(name):
    model, tokenizer = float64(name)
    family = layout_of(model)
    layer, cache, h, args, kwargs = decode_step_inputs(model, tokenizer)
    signature = inspect.signature(layer.forward)  # what the engine binds: the bound forward
    before = layer_kv(cache, LAYER)
    with torch.no_grad():
        whole = layer(h, *args, **kwargs)  # (B, 1, C)
        written = layer_kv(cache, LAYER)
        assert written[0].shape[-2] == before[0].shape[-2] + 1

        rollback(cache, LAYER, before)
        write_kv_only(layer, family, signature, h, args, kwargs)
        assert all(torch.equal(a, b) for a, b in zip(layer_kv(cache, LAYER), written, strict=True))

        rollback(cache, LAYER, before)
        run = torch.tensor([True, False, True])
        some = run_rows(layer, family, signature, h, run, args, kwargs)
        assert all(torch.equal(a, b) for a, b in zip(layer_kv(cache, LAYER), written, strict=True))
    assert torch.allclose(some[run], whole[run], rtol=0, atol=1e-12)  # the running rows: the whole layer
    assert torch.equal(some[~run], h[~run])  # the skipping row keeps its input
    assert not torch.equal(whole[~run], h[~run])  # (which the whole layer would have changed)


def test_the_attention_block_is_the_layers_own():
    model, tokenizer = float64("tiny-llama")
    family = layout_of(model)
    layer, cache, h, args, kwargs = decode_step_inputs(model, tokenizer)
    signature = inspect.signature(layer.forward)
    with torch.no_grad():
        x, out = attention_block(layer, family, signature, h, args, kwargs)
    assert torch.equal(x, layer.input_layernorm(h))
    assert out.shape == h.shape
