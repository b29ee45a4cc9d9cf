"""Part of a decoder layer: what a skipping token still computes, and a layer run for some rows only.

A token that skips layer l still writes its K/V there (CALM's state propagation, SkipLayer's partial skipping),
so later tokens find a complete cache. Two ways to write them:

    K/V only        k = rope(k_proj(n(h))), v = v_proj(n(h)), appended to layer l's cache   (families with
                    ``kv_rope``: the LLaMA layout; 2 * d * d_kv * 2 FLOPs per token instead of the whole layer)
    attention block attn(n(h)) run for its side effect                                      (every other family)

where n is the layer's attention norm. Both write the same K/V as the full layer would from the same h (the
projections, the RoPE rotation and the cache append are the layer's own: the rotation function is read from the
attention's own module), so cached decoding still equals the no-cache reference.

``run_rows`` serves a batched decode step where some rows run the layer and the rest skip it: the attention
block runs for every row (it writes their K/V), the MLP only for the running rows (gathered, then scattered
back), so a row that skips does not pay for the MLP:

    a = h + attn(n1(h))                         (every row)
    out[r] = a[r] + mlp(n2(a[r]))  if r runs, else h[r]              (sequential: LLaMA, GPT-2, OPT, Phi-3)
    out[r] = attn(n1(h))[r] + mlp(n2(h[r])) + h[r]  if r runs, else h[r]   (parallel: GPT-NeoX; Phi: n2 = n1)

Gemma's extra norms on the attention's and the MLP's outputs (``attn_out_norm``, ``mlp_out_norm``) apply before
each residual add. The sums are written in the layers' own order, so the running rows get exactly what the
whole layer gives them.
"""

from __future__ import annotations

import inspect
import sys

import torch

from hsd_exp.models.layout import mlp_of

# what a layer hands its attention; GPT-NeoX's layers name the cache ``layer_past``
_ATTN_ARGS = ("cache", "past_key_values", "layer_past", "attention_mask", "position_ids", "position_embeddings",
              "use_cache")
_CACHE_ARGS = ("cache", "past_key_values", "layer_past")


def _attention_inputs(signature: inspect.Signature, h, args, kwargs) -> dict:
    """The keyword arguments the layer hands its attention, from what the layer's forward got."""
    bound = signature.bind(h, *args, **kwargs).arguments
    extra = bound.pop(next(n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), {})
    return {**{k: bound[k] for k in _ATTN_ARGS if k in bound}, **extra}


def attention_block(layer, layout, signature: inspect.Signature, h, args, kwargs):
    """(n1(h), attn(n1(h))): the layer's attention on its normed input, writing K/V like the whole layer (with
    Gemma's norm on its output)."""
    x = getattr(layer, layout.attn_norm)(h)  # (B, Q, C)
    out = getattr(layer, layout.attn)(x, **_attention_inputs(signature, h, args, kwargs))
    out = out[0] if isinstance(out, tuple) else out
    if layout.attn_out_norm is not None:
        out = getattr(layer, layout.attn_out_norm)(out)
    return x, out


def write_kv_only(layer, layout, signature: inspect.Signature, h, args, kwargs) -> None:
    """Write this position's K/V at ``layer`` from the state h (B, Q, C) it would have received, and nothing else."""
    inputs = _attention_inputs(signature, h, args, kwargs)
    cache = next((inputs[k] for k in _CACHE_ARGS if inputs.get(k) is not None), None)
    if cache is None:  # no cache to complete (a cache-less forward): nothing to write
        return
    if not layout.kv_rope:
        attention_block(layer, layout, signature, h, args, kwargs)
        return
    attn = getattr(layer, layout.attn)
    x = getattr(layer, layout.attn_norm)(h)  # (B, Q, C)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape).transpose(1, 2)  # (B, H_kv, Q, D)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if getattr(attn, "k_norm", None) is not None:  # Qwen3 / Gemma-3 norm K per head before RoPE
        k = attn.k_norm(k)
    cos, sin = inputs["position_embeddings"]
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own RoPE
    _, k = rotate(k, k, cos, sin)
    cache.update(k, v, attn.layer_idx)


def run_rows(layer, layout, signature: inspect.Signature, h, run: torch.Tensor, args, kwargs) -> torch.Tensor:
    """One decode step of ``layer`` where only the rows with ``run`` (B,) bool run it; the others pass h through.
    h: (B, Q, C). Every row writes its K/V (the attention block runs for all); the MLP runs for ``run`` rows."""
    x, attn_out = attention_block(layer, layout, signature, h, args, kwargs)  # (B, Q, C) each
    rows = run.nonzero().squeeze(-1)  # (R,)
    mlp = mlp_of(layer, layout)
    if layout.parallel:  # the MLP reads h too: normed by attn_norm (Phi) or by its own norm (GPT-NeoX)
        m = mlp(x[rows] if layout.mlp_norm is None else getattr(layer, layout.mlp_norm)(h[rows]))
        ran = attn_out[rows] + m + h[rows]
    else:  # sequential: the MLP reads the normed post-attention state
        a = h[rows] + attn_out[rows]
        m = mlp(getattr(layer, layout.mlp_norm)(a))
        if layout.mlp_out_norm is not None:
            m = getattr(layer, layout.mlp_out_norm)(m)
        ran = a + m
    return h.index_copy(0, rows, ran)  # (B, Q, C): running rows scattered back, the rest keep h


__all__ = ["attention_block", "run_rows", "write_kv_only"]
