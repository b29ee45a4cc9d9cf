"""The KV-cache side of skipping: the cache argument's name and a cache that reports its true length. (The K/V-only
write of a skipped layer is in hsd_exp.skip.partial.)"""

from __future__ import annotations

import inspect

from transformers import DynamicCache

from hsd_exp.models.layout import unwrap


def cache_argument(model) -> str:
    """generate()'s (and the forwards') cache argument: "cache" from transformers 5.24 on, "past_key_values"
    before. Read off the model class's ``forward``: instance hooks (accelerate) may wrap the bound one."""
    return "cache" if "cache" in inspect.signature(type(unwrap(model)).forward).parameters else "past_key_values"


class SkipCache(DynamicCache):
    """A DynamicCache whose length is the longest layer's: layer 0 may be skipped and stay short.

    transformers sizes the attention masks from one layer per kind (the first full-attention layer, the first
    sliding one), which may be a skipped layer. The true length n is the longest layer's (a layer that runs has
    every position; sliding layers count every position they saw, though they keep only the last window - 1).
    Masks are sized as a layer of that kind holding n positions would size them. ``count_from = E`` counts only
    layers E.. (lossless mode's top-only verification, which runs them while the bottom ones already hold more).
    """

    count_from: int = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((layer.get_seq_length() for layer in self.layers[self.count_from:]), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) of a running layer of ``layer_idx``'s kind: DynamicSlidingWindowLayer's rule with
        the true length for a sliding layer, else every position."""
        n = self.get_seq_length()
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        if window is None or n < window:
            return n + query_length, 0
        return window - 1 + query_length, n - window + 1

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def truncate(self, length: int, first: int = 0) -> None:
        """Keep the first ``length`` positions of every layer from ``first`` on (shorter ones keep theirs): lossless mode
        drops the drafts' K/V before verifying and the rejected positions after. Sliding layers can only go back
        past their window after ``activate_past_recording()`` (lossless mode calls it); they are then cut back to
        the window here too (``crop(0)``), so they stay small."""
        for layer in self.layers[first:]:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)
            elif getattr(layer, "record_past", False) and layer.is_initialized:
                layer.crop(0)  # a sliding layer that kept its past: back to its window

    def drop(self, layers) -> None:
        """Empty the caches of ``layers`` (0-based): a static policy's skipped layers, which never run again."""
        for i in layers:
            if i < len(self.layers) and self.layers[i].get_seq_length() > 0:
                self.layers[i].keys = self.layers[i].keys[..., :0, :]  # (B, H, 0, D)
                self.layers[i].values = self.layers[i].values[..., :0, :]
