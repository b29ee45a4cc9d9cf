"""Every tested family (hsd_exp.families.TESTED), read off its tiny random model: cached decoding == the no-cache
reference under HSD, SkipDecode and CALM, greedy and beam 4, batch 3 left-padded. Gemma-3 (sliding-window layers,
layer 1 among them, window 6) and Mistral (every layer sliding, window 8) decode well past their windows."""

import copy

import pytest
import torch

from hsd_exp import build_policy, layer_skipping
from hsd_exp.errors import ConfigError
from hsd_exp.families import TESTED, decoder_layers
from hsd_exp.models import load_model
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
