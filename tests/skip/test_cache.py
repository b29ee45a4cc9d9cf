"""SkipCache (hsd_exp.skip.cache): the true length is the longest layer's, masks are sized as a running layer of each
kind would size them, and truncate / drop cut exactly what lossless mode and static skipping need cut. The direct
tests build caches by hand (no model); the last two show generation breaking without SkipCache's rules."""

import pytest
import torch
from transformers import DynamicCache, Gemma3TextConfig, LlamaConfig
from transformers.cache_utils import DynamicSlidingWindowLayer

from hsd_exp.skip.cache import SkipCache
from hsd_exp.skip.policies import build_policy

from helpers import generate, load

WINDOW = 4
SMALL = dict(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, head_dim=2, intermediate_size=8,
             vocab_size=10)


def full_cache(layers: int = 3) -> SkipCache:
    return SkipCache(config=LlamaConfig(num_hidden_layers=layers, **SMALL))


def mixed_cache() -> SkipCache:
    """Gemma-3's layout: layer 1 sliding (window 4), layer 2 global, layer 3 sliding."""
    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    return SkipCache(config=Gemma3TextConfig(num_hidden_layers=3, layer_types=kinds, sliding_window=WINDOW, **SMALL))


def kv(n: int, start: int = 0):
    """(keys, values) for n positions, each position's key holding its own index: (1, 1, n, 2)."""
    k = torch.arange(start, start + n, dtype=torch.float).view(1, 1, n, 1).expand(1, 1, n, 2).clone()
    return k, k.clone()


def fill(cache: SkipCache, lengths: list[int]) -> SkipCache:
    """Layer i holds lengths[i] positions (0: left empty, as a skipped layer is), written one prefill each."""
    for i, n in enumerate(lengths):
        if n:
            cache.update(*kv(n), i)
    return cache


def test_the_length_is_the_longest_layers_not_layer_ones():
    cache = fill(full_cache(), [0, 7, 5])  # layer 1 skipped throughout, layer 3 since position 5
    assert cache.get_seq_length() == 7 and cache.get_query_offset() == 7
    assert DynamicCache.get_seq_length(cache) == 0  # what transformers would read: layer 1's
    assert cache.get_seq_length(layer_idx=2) == 7  # whichever layer generate() asks about
    assert full_cache().get_seq_length() == 0  # nothing written yet


def test_count_from_counts_only_the_layers_from_e_on():
    """Lossless verification above the exact bottom: layers 1..E already hold the drafts' positions."""
    cache = fill(full_cache(), [9, 9, 6])
    cache.count_from = 2
    assert cache.get_seq_length() == 6
    cache.count_from = 0
    assert cache.get_seq_length() == 9


def test_full_attention_masks_cover_every_position():
    cache = fill(full_cache(), [0, 7, 7])
    assert cache.get_mask_sizes(3, layer_idx=0) == (10, 0)  # the skipped layer 1 is sized like the others


@pytest.mark.parametrize("n", [2, WINDOW - 1, WINDOW, 9])
def test_a_skipped_sliding_layers_mask_is_what_a_running_one_would_get(n):
    """Layer 1 (sliding) is empty; its masks must match a sliding layer that saw all n positions, before and after
    the window fills; the global layer 2 still covers every position."""
    cache = fill(mixed_cache(), [0, n, n])
    running = DynamicSlidingWindowLayer(sliding_window=WINDOW)
    running.update(*kv(n))
    for q in (1, 3):
        assert cache.get_mask_sizes(q, layer_idx=0) == running.get_mask_sizes(q)
        assert cache.get_mask_sizes(q, layer_idx=1) == (n + q, 0)
    assert cache.layers[2].keys.shape[-2] == min(n, WINDOW - 1)  # the sliding layer keeps only its window


def test_truncate_keeps_the_first_positions_and_leaves_shorter_layers_alone():
    cache = fill(full_cache(), [4, 9, 7])
    cache.truncate(6)
    assert [layer.get_seq_length() for layer in cache.layers] == [4, 6, 6]
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]  # the first six, not the last


def test_truncate_from_e_leaves_the_bottom_layers_whole():
    cache = fill(full_cache(), [9, 9, 9])
    cache.truncate(5, first=1)
    assert [layer.get_seq_length() for layer in cache.layers] == [9, 5, 5]


def test_truncate_takes_a_recording_sliding_layer_back_past_its_window():
    """Lossless mode cuts rejected drafts off sliding layers too: with past recording on, the layer goes back to
    n positions and keeps only the window before position n (its own keys say which)."""
    cache = mixed_cache()
    cache.activate_past_recording()
    for i in range(3):
        cache.update(*kv(5), i)
        for p in range(5, 8):
            cache.update(*kv(1, start=p), i)
    cache.truncate(6)
    assert [layer.get_seq_length() for layer in cache.layers] == [6, 6, 6]
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [3, 4, 5]  # positions 3..5: the window ending at 5
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == list(range(6))
    cache.update(*kv(1, start=6), 0)  # decoding goes on from position 6: its window is 4..6
    assert cache.layers[0].get_seq_length() == 7
    assert cache.layers[0].keys[0, 0, -(WINDOW - 1):, 0].tolist() == [4, 5, 6]
    cache.truncate(7)  # nothing to cut, yet a recording sliding layer goes back to its window: it stays small
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [4, 5, 6] and cache.layers[0].get_seq_length() == 7


def test_drop_empties_the_named_layers_only():
    cache = fill(full_cache(), [5, 5, 5])
    cache.drop([0, 2])
    assert [layer.keys.shape[-2] for layer in cache.layers] == [0, 5, 0]
    assert cache.get_seq_length() == 5


# ------------------------------------------------------------------------- what breaks without SkipCache's rules
def test_engine_without_skipcache_would_be_corrupted(tiny, monkeypatch):
    """Sensitivity check: with transformers' default length (layer 0's cache), HSD decoding breaks."""
    policy = build_policy("hsd", s=1, min=0, max=4)
    reference, _ = generate(tiny, policy, 2, 1, use_cache=False, do_sample=False)
    monkeypatch.setattr(SkipCache, "get_seq_length", DynamicCache.get_seq_length)
    monkeypatch.setattr(SkipCache, "get_mask_sizes", DynamicCache.get_mask_sizes)
    monkeypatch.setattr(SkipCache, "get_query_offset", DynamicCache.get_query_offset)
    try:
        broken, _ = generate(tiny, policy, 2, 1, use_cache=True, do_sample=False)
    except (RuntimeError, IndexError, ValueError):
        return  # shape errors are one way to break
    assert not torch.equal(broken, reference)


def test_window_blind_mask_sizes_would_break_gemma3(monkeypatch):
    """Sensitivity: sizing every mask by the full length (SkipCache's rule before sliding layers) fails."""
    lm = load("tiny-gemma3_text")
    policy = build_policy("hsd", s=1, min=0, max=4)
    reference, _ = generate(lm, policy, 3, 1, use_cache=False, do_sample=False)
    monkeypatch.setattr(SkipCache, "get_mask_sizes", lambda self, q, layer_idx=0: (self.get_seq_length() + q, 0))
    try:
        broken, _ = generate(lm, policy, 3, 1, use_cache=True, do_sample=False)
    except (RuntimeError, IndexError, ValueError):
        return  # the shape mismatch the issue reported
    assert not torch.equal(broken, reference)
