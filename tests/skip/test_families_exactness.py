"""Every tested family (hsd_exp.models.layout.TESTED), read off its tiny random model: cached decoding == the no-cache
reference under HSD, SkipDecode and CALM, greedy and beam 4, batch 3 left-padded. Gemma-3 (sliding-window layers,
layer 1 among them, window 6) and Mistral (every layer sliding, window 8) decode well past their windows; the real
Gemma-3-270M (slow) too. Kept as one file across families, parametrised by ``families.TESTED``, beside
test_engine.py, whose tests run the fast suite's three tiny families."""

import copy

import pytest
import torch

from hsd_exp import build_policy, layer_skipping
from hsd_exp.errors import ConfigError
from hsd_exp.models.layout import TESTED, decoder_layers, layout_of
from hsd_exp.models.loading import load_model
from hsd_exp.skip.cache import SkipCache

from helpers import CACHE_DIR, PROMPTS, Replay, T, generate, load

STATIC = [("hsd", {"s": 1, "min": 0, "max": 4}), ("skipdecode", {"min": 1, "max": 4})]


@pytest.mark.parametrize("family", TESTED)
@pytest.mark.parametrize("name,params", STATIC, ids=["hsd", "skipdecode"])
@pytest.mark.parametrize("beams", [1, 4])
def test_cached_equals_no_cache_reference(family, name, params, beams):
    lm = load(f"tiny-{family}")
    policy = build_policy(name, num_layers=6, **params)
    cached, stats = generate(lm, policy, 3, beams, use_cache=True, do_sample=False)
    reference, ref_stats = generate(lm, policy, 3, beams, use_cache=False, do_sample=False)
    assert torch.equal(cached, reference)
    assert stats.per_step == ref_stats.per_step and 0 not in stats.step_layers[0]  # layer 1 skipped


@pytest.mark.parametrize("family", TESTED)
@pytest.mark.parametrize("beams", [1, 4])
def test_calm_equals_a_no_cache_replay_of_its_exits(family, beams):
    """The layers above each exit write K/V from the exited state (hsd_exp.skip.partial): K/V only on the LLaMA
    layout, the attention block elsewhere. The replay recomputes everything without a cache."""
    lm = load(f"tiny-{family}")
    cached, stats = generate(lm, build_policy("calm", d=0.2, criterion="state"), 3, beams, use_cache=True,
                             do_sample=False)
    exits = tuple(e.exit_layer for e in stats.calm_exits)
    assert min(exits) < 6  # some tokens exited early, or the replay proves nothing
    reference, _ = generate(lm, Replay(exits=exits), 3, beams, use_cache=False, do_sample=False)
    assert torch.equal(cached, reference)


# ---------------------------------------------------------------------------------------- sliding windows
@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_sliding_layers_keep_only_their_window_while_layer_one_is_skipped(family):
    lm = load(f"tiny-{family}")
    config = lm.model.config
    enc = lm.tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    assert enc.input_ids.shape[1] + T > config.sliding_window + 4  # decoding runs well past the window
    policy = build_policy("hsd", s=1, min=0, max=4)
    with layer_skipping(lm.model, policy, max_new_tokens=T):
        out = lm.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                                return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, SkipCache) and cache.layers[0].is_sliding
    final = set(policy.layers(T - 2, T, 6))
    for i, layer in enumerate(cache.layers):
        held = layer.keys.shape[-2]
        if i not in final:
            assert held == 0  # skipped: dropped
        elif layer.is_sliding:
            assert held == config.sliding_window - 1  # the window, not the sequence
        else:
            assert held == enc.input_ids.shape[1] + T - 1


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
@pytest.mark.parametrize("draft", ["hsd", "calm", "early_exit"])
def test_lossless_with_sliding_layers_is_plain_greedy(family, draft):
    """SkipCache.truncate cuts sliding layers back past their window (drafts, rejected positions); an early-exit
    draft's verification runs only the layers above its exit, on top of the sliding bottom layers' K/V."""
    lm = load(f"tiny-{family}")
    model = copy.deepcopy(lm.model).double()
    enc = lm.tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": T, "do_sample": False, "pad_token_id": lm.tokenizer.pad_token_id}
    plain = model.generate(**enc, **kw)
    policy = {"hsd": build_policy("hsd", s=1, min=0, max=4), "calm": build_policy("calm", d=0.1),
              "early_exit": build_policy("early_exit", layer=2)}[draft]
    with layer_skipping(model, policy, max_new_tokens=T, lossless=True, draft_len=3) as stats:
        out = model.generate(**enc, **kw)
    assert torch.equal(out, plain)
    assert stats.lossless.verifications > 0


# ------------------------------------------------------------------------------------------- refusals
def test_a_model_the_engine_cannot_serve_fails_before_generating_with_one_line():
    """OPT-350m's layout (norm after attention): load_model refuses it, naming the model_type and the reason."""
    with pytest.raises(ConfigError) as err:
        load_model("opt-post-norm", "opt", source="tiny", cache_dir=CACHE_DIR, device="cpu", dtype="float32",
                   tiny={"layers": 2, "hidden": 64, "heads": 4, "do_layer_norm_before": False})
    msg = str(err.value)
    assert "'opt'" in msg and "do_layer_norm_before=False" in msg and "\n" not in msg, msg


def test_layer_skipping_refuses_an_unservable_model_before_generate():
    model = copy.deepcopy(load("tiny-opt").model)
    model.config.do_layer_norm_before = False  # what the layers read is irrelevant: the check comes first
    with pytest.raises(ConfigError, match="model_type 'opt'.*do_layer_norm_before=False"):
        with layer_skipping(model, build_policy("hsd", s=1, min=0, max=4), max_new_tokens=T):
            pass
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(load("tiny-opt").model))


# ------------------------------------------------------------------------------- the real Gemma-3-270M (slow)
# 18 layers: 15 sliding-window 512 + 3 global; 262k vocabulary, float32 on the CPU: the conversion keeps the weights
# intact, and cached decoding == the no-cache reference under HSD and SkipDecode, greedy, batch 2 left-padded, also
# once decoding runs past the sliding window. Skipped where its GGUF packages are not installed (the ``gemma3``
# fixture).
GEMMA3_L = 18
NEW = 16  # new tokens per generate()
GEMMA3_POLICIES = [  # the paper's shapes scaled to L = 18 (hsd(1,0,18) on 30 layers -> hsd(1,0,10) on 18)
    ("hsd", {"s": 1, "min": 0, "max": 10}),
    ("hsd", {"s": 2, "min": 0, "max": 6}),
    ("skipdecode", {"min": 6, "max": 12}),
    ("hsd", {"s": 1, "min": 0, "max": 10, "keep_first": 1}),
]


def run_gemma3(lm, policy, prompts, use_cache, new=NEW):
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
    assert layout_of(gemma3.model).attn_out_norm == "post_attention_layernorm"  # Gemma's norms after attn and MLP
    enc = gemma3.tokenizer(["Water boils at a temperature of"], return_tensors="pt")
    with torch.no_grad():
        out = gemma3.model.generate(**enc, max_new_tokens=6, do_sample=False)
    answer = gemma3.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "100" in answer, answer


@pytest.mark.slow
@pytest.mark.parametrize("name,params", GEMMA3_POLICIES, ids=["hsd_s1_max10", "hsd_s2_max6", "skipdecode_6_12",
                                                       "hsd_s1_max10_keep1"])
def test_gemma3_cached_equals_no_cache_reference(gemma3, name, params):
    policy = build_policy(name, num_layers=GEMMA3_L, **params)
    enc, cached, stats = run_gemma3(gemma3, policy, PROMPTS[:2], use_cache=True)
    assert (enc.attention_mask[:, 0] == 0).any()  # left-padded
    _, reference, ref_stats = run_gemma3(gemma3, policy, PROMPTS[:2], use_cache=False)
    assert torch.equal(cached, reference)
    assert stats.per_step == ref_stats.per_step and stats.avg_layers < GEMMA3_L
    if not params.get("keep_first"):
        assert 0 not in stats.step_layers[0]  # layer 1, a sliding-window layer, skipped


@pytest.mark.slow
def test_gemma3_exact_past_the_sliding_window(gemma3):
    """A 506-token prompt: decoding crosses the 512-token window of the sliding layers while layer 1 (sliding) is
    skipped; the cache keeps only the window there and the masks stay right."""
    policy = build_policy("hsd", num_layers=GEMMA3_L, s=1, min=0, max=10)
    prompt = " ".join(["one two three four five six seven eight nine ten"] * 50 + ["one two three four five"])
    assert len(gemma3.tokenizer(prompt).input_ids) == 506  # with <bos>; 506 + 12 new tokens > 512
    new = 12
    _, cached, stats = run_gemma3(gemma3, policy, [prompt], use_cache=True, new=new)
    _, reference, _ = run_gemma3(gemma3, policy, [prompt], use_cache=False, new=new)
    assert torch.equal(cached, reference)
    assert 0 not in stats.step_layers[0]
