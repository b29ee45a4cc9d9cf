"""The KV-cache side of skipping: the cache argument's name and a cache that reports its true length. (The K/V-only
write of a skipped layer is in hsd_exp.skip.partial.)"""

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

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer (layers already shorter keep theirs): lossless mode
        drops the drafts' K/V before verifying and the rejected positions after."""
        for layer in self.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)
