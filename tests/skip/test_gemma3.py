"""The real Gemma-3-270M (18 layers: 15 sliding-window 512 + 3 global; 262k vocabulary), float32 on the CPU: the
conversion keeps the weights intact, and cached decoding == the no-cache reference (each position recomputed
with its own layer set) under HSD and SkipDecode, greedy, batch 2 left-padded, also once decoding runs past
the sliding window. Skipped where its GGUF packages are not installed (conftest's ``gemma3`` fixture)."""

import pytest
import torch

from hsd_exp import build_policy, layer_skipping
from hsd_exp.families import family_of

from helpers import PROMPTS

L = 18
NEW = 16  # new tokens per generate()
POLICIES = [  # the paper's shapes scaled to L = 18 (hsd(1,0,18) on 30 layers -> hsd(1,0,10) on 18)
    ("hsd", {"s": 1, "min": 0, "max": 10}),
    ("hsd", {"s": 2, "min": 0, "max": 6}),
    ("skipdecode", {"min": 6, "max": 12}),
    ("hsd", {"s": 1, "min": 0, "max": 10, "keep_first": 1}),
]


def run(lm, policy, prompts, use_cache, new=NEW):
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    with layer_skipping(lm.model, policy, max_new_tokens=new) as stats:
        out = lm.model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                use_cache=use_cache)
    return enc, out, stats


@pytest.mark.slow
def test_gemma3_converts_and_answers(gemma3):
    config = gemma3.model.config
    assert (gemma3.family, config.model_type, gemma3.num_layers, gemma3.chat) == ("gemma3_text", "gemma3_text", 18,
                                                                                  False)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    assert config.vocab_size == 262144 and config.tie_word_embeddings
    assert family_of(gemma3.model).attn_out_norm == "post_attention_layernorm"  # Gemma's norms after attn and MLP
    enc = gemma3.tokenizer(["Water boils at a temperature of"], return_tensors="pt")
    with torch.no_grad():
        out = gemma3.model.generate(**enc, max_new_tokens=6, do_sample=False)
    answer = gemma3.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "100" in answer, answer


@pytest.mark.slow
@pytest.mark.parametrize("name,params", POLICIES, ids=["hsd_s1_max10", "hsd_s2_max6", "skipdecode_6_12",
                                                       "hsd_s1_max10_keep1"])
def test_gemma3_cached_equals_no_cache_reference(gemma3, name, params):
    policy = build_policy(name, num_layers=L, **params)
    enc, cached, stats = run(gemma3, policy, PROMPTS[:2], use_cache=True)
    assert (enc.attention_mask[:, 0] == 0).any()  # left-padded
    _, reference, ref_stats = run(gemma3, policy, PROMPTS[:2], use_cache=False)
    assert torch.equal(cached, reference)
    assert stats.per_step == ref_stats.per_step and stats.avg_layers < L
    if not params.get("keep_first"):
        assert 0 not in stats.step_layers[0]  # layer 1, a sliding-window layer, skipped


@pytest.mark.slow
def test_gemma3_exact_past_the_sliding_window(gemma3):
    """A 506-token prompt: decoding crosses the 512-token window of the sliding layers while layer 1 (sliding) is
    skipped; the cache keeps only the window there and the masks stay right."""
    policy = build_policy("hsd", num_layers=L, s=1, min=0, max=10)
    prompt = " ".join(["one two three four five six seven eight nine ten"] * 50 + ["one two three four five"])
    assert len(gemma3.tokenizer(prompt).input_ids) == 506  # with <bos>; 506 + 12 new tokens > 512
    new = 12
    _, cached, stats = run(gemma3, policy, [prompt], use_cache=True, new=new)
    _, reference, _ = run(gemma3, policy, [prompt], use_cache=False, new=new)
    assert torch.equal(cached, reference)
    assert 0 not in stats.step_layers[0]
