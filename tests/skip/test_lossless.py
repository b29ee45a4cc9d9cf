"""Lossless mode: whatever the draft policy, greedy generate() inside layer_skipping(..., lossless=True) returns
plain greedy generate()'s tokens, EOS and padding included, at batch 1 and batch 3 (left-padded). Sampling:
tests/skip/test_lossless_sampling.py."""

import copy
from contextlib import contextmanager

import pytest
import torch

from hsd_exp import SkipRouter, build_policy, layer_skipping
from hsd_exp.errors import ConfigError
from hsd_exp.skip.lossless import LosslessSettings, exact_bottom

from helpers import PROMPTS, load

T = 12
DRAFTS = {
    "hsd": lambda model: build_policy("hsd", s=1, min=0, max=4),
    "skipdecode_keep_first": lambda model: build_policy("skipdecode", min=2, max=4, keep_first=1),
    "calm": lambda model: build_policy("calm", d=0.1),
    "skiplayer": lambda model: build_policy("skiplayer", router=random_router(model)),
    "early_exit": lambda model: build_policy("early_exit", layer=3),
    "full": lambda model: build_policy("full"),
}


def random_router(model):
    torch.manual_seed(0)
    router = SkipRouter.for_model(model, kind="linear", init_bias=0.0)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return router.to(next(model.parameters()).dtype).eval()


def float64(name):
    lm = load(name)
    return copy.deepcopy(lm.model).double(), lm.tokenizer


def greedy(model, tokenizer, batch, **kw):
    enc = tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": T, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, **kw}
    return model.generate(**enc, **kw)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-phi", "tiny-llama"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("draft", sorted(DRAFTS))
def test_lossless_output_is_plain_greedy_output(name, batch, draft):
    model, tokenizer = float64(name)
    plain = greedy(model, tokenizer, batch)
    with layer_skipping(model, DRAFTS[draft](model), max_new_tokens=T, lossless=True, draft_len=3) as stats:
        out = greedy(model, tokenizer, batch)
    assert torch.equal(out, plain)
    s = stats.lossless
    assert s.verifications > 0 and s.committed == T - 1  # every token after the prefill's came from a round
    assert 0 <= s.accepted <= s.drafted
    if draft == "full":  # a full-depth draft is always right: every round commits draft_len + 1 tokens
        assert s.acceptance == 1.0 and s.tokens_per_verification > 3


@contextmanager
def forward_log(model):
    """Every forward of the decoder stack while inside, as the model saw it: {"width": query positions, "head":
    whether the LM head ran (a model forward, not a stack-only one), "layers": the layers whose MLP ran}. Read off
    hooks on the modules, not off the engine's counters."""
    calls, in_model = [], [False]
    stack, layers = model.model, model.model.layers
    handles = [model.register_forward_pre_hook(lambda m, a: in_model.__setitem__(0, True)),
               model.register_forward_hook(lambda m, a, o: in_model.__setitem__(0, False)),
               stack.register_forward_pre_hook(lambda m, a, kw: calls.append(
                   {"width": kw["input_ids"].shape[1], "head": in_model[0], "layers": set()}), with_kwargs=True)]
    for i, layer in enumerate(layers):  # a layer's MLP runs only when the layer does (a skip returns its input)
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls[-1]["layers"].add(i)))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("draft", ["early_exit", "skipdecode_keep_first", "hsd", "calm", "full"])
def test_verification_runs_only_the_layers_above_the_drafts_exact_bottom(draft):
    """Drafts that run layers 1..E at every T left the full model's K/V and state there: verification runs
    layers E+1..L on those states, so layer 1 never sees more than one new position after the prompt.

    The counts are the model's, from hooks: after the prefill (width P) a model forward is a draft (width 1) or a
    verification (width k + 1 after its round's k drafts), so with N model forwards of total width W the
    verifications number V = 2 (N - 1) - (W - P) and the drafts D = N - 1 - V; T - 1 tokens in V rounds of
    a + 1 accepted: the accepted drafts number T - 1 - V."""
    model, tokenizer = float64("tiny-llama")
    L, policy = model.config.num_hidden_layers, DRAFTS[draft](model)
    E = exact_bottom(policy, T, L)
    assert E == {"early_exit": 3, "skipdecode_keep_first": 1, "hsd": 0, "calm": 0, "full": L - 1}[draft]
    plain = greedy(model, tokenizer, 3)
    with forward_log(model) as calls, \
            layer_skipping(model, policy, max_new_tokens=T, lossless=True, draft_len=3) as stats:
        out = greedy(model, tokenizer, 3)
    assert torch.equal(out, plain) and (out[:, -T:] != tokenizer.pad_token_id).all()  # no row ended early
    heads, bottoms = [c for c in calls if c["head"]], [c for c in calls if not c["head"]]
    P = heads[0]["width"]
    assert heads[0]["layers"] == set(range(L))  # the prefill: every layer
    N, W = len(heads), sum(c["width"] for c in heads)
    V = 2 * (N - 1) - (W - P)
    verifies = [c for c in heads[1:] if c["width"] > 1]  # the ones a width tells apart (k >= 1)
    assert V >= len(verifies) >= 1
    assert all(c["layers"] == set(range(E, L)) for c in verifies)  # layers E+1..L, nothing below
    assert bottoms == [{"width": 1, "head": False, "layers": set(range(E))}] * (V if E else 0)  # d_k's bottom pass
    s = stats.lossless
    assert s.verifications == V and s.verified_layers == V * (L - E)
    assert s.drafted == N - 1 - V and s.accepted == T - 1 - V
    assert s.summary(3)["verify_avg_layers"] == L - E
    widths_at_layer_1 = [c["width"] for c in calls[1:] if 0 in c["layers"]]
    if E:
        assert max(widths_at_layer_1) == 1  # after the prefill: drafts and d_k's bottom pass, one position each
    else:
        assert max(widths_at_layer_1) > 1  # the verify forwards run layer 1 on x_n, d_1..d_k


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("confidence", [0.6, 1.0])
def test_an_adaptive_draft_length_stays_exact_and_stops_drafting_when_unsure(batch, confidence):
    """draft_confidence=c: a round stops drafting once some row's top draft probability is below c. At c=1 every
    draft is unsure, so every round drafts one token; the output is plain greedy's either way."""
    model, tokenizer = float64("tiny-llama")
    plain = greedy(model, tokenizer, batch)
    policy = build_policy("skipdecode", min=2, max=4, keep_first=1)
    with layer_skipping(model, policy, max_new_tokens=T, lossless=True, draft_len=4,
                        draft_confidence=confidence) as stats:
        out = greedy(model, tokenizer, batch)
    with layer_skipping(model, policy, max_new_tokens=T, lossless=True, draft_len=4) as fixed:
        greedy(model, tokenizer, batch)
    assert torch.equal(out, plain)
    s = stats.lossless
    if confidence == 1.0:
        assert s.verifications - 1 <= s.drafted <= s.verifications  # one draft a round (the last may have none)
    assert s.drafted < fixed.lossless.drafted  # the tiny model's drafts are unsure: fewer drafted than k per round


def test_a_bad_draft_confidence_is_refused():
    model, tokenizer = float64("tiny-llama")
    with pytest.raises(ConfigError, match="draft_confidence=0 is out of range"), \
            layer_skipping(model, build_policy("full"), max_new_tokens=T, lossless=True, draft_confidence=0):
        greedy(model, tokenizer, 1)


def test_lossless_settings_decode_as_the_keywords_do_and_check_their_values():
    model, tokenizer = float64("tiny-llama")
    policy = build_policy("hsd", s=1, min=0, max=4)
    with layer_skipping(model, policy, max_new_tokens=T, lossless=True, draft_len=3) as keywords:
        by_keywords = greedy(model, tokenizer, 3)
    with layer_skipping(model, policy, max_new_tokens=T, lossless=LosslessSettings(draft_len=3)) as settings:
        by_settings = greedy(model, tokenizer, 3)
    assert torch.equal(by_keywords, by_settings) and keywords.lossless == settings.lossless
    with pytest.raises(ValueError, match="inside LosslessSettings"), \
            layer_skipping(model, policy, max_new_tokens=T, lossless=LosslessSettings(), draft_len=3):
        pass
    with pytest.raises(ConfigError, match="decode.draft_len=True must be a positive integer"):
        LosslessSettings(draft_len=True)
    with pytest.raises(ConfigError, match="decode.draft_confidence=1.5 is out of range"):
        LosslessSettings(draft_confidence=1.5)
    assert LosslessSettings(2, 1) == LosslessSettings(draft_len=2, draft_confidence=1)  # c = 1 is a probability


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_rows_that_end_are_padded_as_plain_generate_pads_them(name):
    model, tokenizer = float64(name)
    free = greedy(model, tokenizer, 3)
    P = free.shape[1] - T
    eos = int(free[1, P + 4])  # row 1's fifth token becomes "EOS": it ends there, the others later or never
    plain = greedy(model, tokenizer, 3, eos_token_id=eos)
    assert (plain[1, P + 5:] == tokenizer.pad_token_id).all()  # (the case is real: row 1 is padded)
    for min_new in (None, 7):
        kw = {"eos_token_id": eos, **({"min_new_tokens": min_new} if min_new else {})}
        plain = greedy(model, tokenizer, 3, **kw)
        with layer_skipping(model, build_policy("hsd", s=1, min=0, max=4), max_new_tokens=T, lossless=True):
            assert torch.equal(greedy(model, tokenizer, 3, **kw), plain)


def test_lossless_refuses_what_it_cannot_reproduce():
    model, tokenizer = float64("tiny-llama")
    policy = build_policy("hsd", s=1, min=0, max=4)
    with layer_skipping(model, policy, max_new_tokens=T, lossless=True):
        with pytest.raises(ConfigError, match="needs num_beams=1"):
            greedy(model, tokenizer, 1, num_beams=4)
        with pytest.raises(ConfigError, match="needs max_new_tokens"):
            greedy(model, tokenizer, 1, max_new_tokens=None, max_length=20)
        with pytest.raises(ConfigError, match="does not apply typical_p"):
            greedy(model, tokenizer, 1, do_sample=True, typical_p=0.5)
        with pytest.raises(ConfigError, match="does not apply repetition_penalty"):
            greedy(model, tokenizer, 1, repetition_penalty=1.3)
    with pytest.raises(ConfigError, match="draft_len=0 is out of range"), \
            layer_skipping(model, policy, max_new_tokens=T, lossless=True, draft_len=0):
        greedy(model, tokenizer, 1)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("draft", ["hsd", "skipdecode_keep_first", "early_exit"])
def test_smollm2_lossless_output_is_plain_greedy_output(smollm2, batch, draft):
    """Real weights in float32: a batched verification could, in principle, resolve an exact top-2 near-tie
    differently from one-token decoding; on these prompts it does not."""
    policy = {"hsd": build_policy("hsd", s=1, min=0, max=18),
              "skipdecode_keep_first": build_policy("skipdecode", min=10, max=20, keep_first=2),
              "early_exit": build_policy("early_exit", layer=20)}[draft]
    enc = smollm2.tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": smollm2.tokenizer.pad_token_id}
    plain = smollm2.model.generate(**enc, **kw)
    with layer_skipping(smollm2.model, policy, max_new_tokens=24, lossless=True) as stats:
        out = smollm2.model.generate(**enc, **kw)
    assert torch.equal(out, plain)
    assert stats.lossless.drafted > 0 and stats.lossless.verifications <= 23  # (acceptance is a benchmark figure)
