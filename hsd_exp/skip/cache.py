"""The KV-cache side of skipping: the cache argument's name, a cache that reports its true length, and the
K/V-only write a skipped layer still makes (dynamic and per-token policies keep the cache complete with it)."""

from __future__ import annotations

import inspect

from transformers import DynamicCache

from hsd_exp.families import unwrap


def cache_argument(model) -> str:
    """generate()'s (and the forwards') cache argument: "cache" from transformers 5.24 on, "past_key_values"
    before. Read off the model class's ``forward``: instance hooks (accelerate) may wrap the bound one."""
    return "cache" if "cache" in inspect.signature(type(unwrap(model)).forward).parameters else "past_key_values"


class SkipCache(DynamicCache):
    """A DynamicCache whose length is the longest layer's: layer 0 may be skipped and stay short."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((layer.get_seq_length() for layer in self.layers), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # (kv_length, kv_offset)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()


def write_kv_only(layer, family, signature: inspect.Signature, h, args, kwargs) -> None:
    """Run ``layer``'s attention block on attn_norm(h) for its side effect alone: writing this position's K/V
    into the cache, so later tokens that run the layer find it complete. ``args``/``kwargs`` are what the
    layer's forward got (bound by ``signature``); h (B, Q, C) is the state it would have received."""
    bound = signature.bind(h, *args, **kwargs).arguments
    extra = bound.pop(next(n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), {})
    attn_kwargs = {k: bound[k] for k in ("cache", "past_key_values", "attention_mask", "position_ids",
                                         "position_embeddings", "use_cache") if k in bound}
    attn = getattr(layer, family.attn)
    norm = getattr(layer, family.attn_norm)
    attn(norm(h), **attn_kwargs, **extra)
