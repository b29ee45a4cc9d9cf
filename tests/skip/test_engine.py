"""Exactness of the skip engine: cached generation == a no-cache reference where each position runs its own set."""

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

from hsd_exp.errors import ConfigError
from hsd_exp.models.layout import decoder_layers, layout_of, submodule
from hsd_exp.skip.engine import SkipCache, SkipEngine, cache_argument, layer_skipping
from hsd_exp.skip.policies import build_policy

from helpers import ABLATIONS, PAPER_GRID, PROMPTS, TINY_POLICIES, Replay, T, generate, load, output_cache


@pytest.mark.parametrize("name,params", TINY_POLICIES)
@pytest.mark.parametrize("batch,beams", [(1, 1), (4, 1), (1, 4), (4, 4)])
def test_cached_equals_no_cache_reference(tiny, name, params, batch, beams):
    policy = build_policy(name, num_layers=6, **params)
    cached, stats = generate(tiny, policy, batch, beams, use_cache=True, do_sample=False)
    reference, ref_stats = generate(tiny, policy, batch, beams, use_cache=False, do_sample=False)
    assert torch.equal(cached, reference)
    assert stats.per_step == ref_stats.per_step


def test_sampling_is_exact_too(tiny):
    policy = build_policy("hsd", s=1, min=0, max=4)
    torch.manual_seed(0)
    cached, _ = generate(tiny, policy, 4, 1, use_cache=True, do_sample=True, top_k=50)
    torch.manual_seed(0)
    reference, _ = generate(tiny, policy, 4, 1, use_cache=False, do_sample=True, top_k=50)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("batch,beams", [(1, 1), (4, 1), (1, 4), (4, 4)])
def test_full_policy_equals_plain_generate(tiny, batch, beams):
    enc = tiny.tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=T, min_new_tokens=T, num_beams=beams, do_sample=False)  # the same for both calls
    plain = tiny.model.generate(**enc, **kw)
    with layer_skipping(tiny.model, build_policy("full"), max_new_tokens=T) as stats:
        full = tiny.model.generate(**enc, **kw)
    assert torch.equal(plain, full)
    assert stats.avg_layers == 6


def test_stats_and_layer_sets_follow_the_policy(tiny):
    policy = build_policy("hsd", s=1, min=0, max=4)
    _, stats = generate(tiny, policy, 2, 1, use_cache=True, do_sample=False)
    # Generated tokens 0..T-2 are fed back through the model; token T-1 is produced but never processed.
    expected = [policy.layers(t, T, 6) for t in range(T - 1)]
    assert stats.step_layers == expected
    assert stats.per_step == [len(s) for s in expected]
    assert stats.avg_layers == pytest.approx(sum(map(len, expected)) / len(expected))
    assert all(0 not in s for s in stats.step_layers)  # layer 1 really skipped


def test_skipped_layers_hold_no_cache_and_context_restores_the_model(tiny):
    model = tiny.model
    enc = tiny.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    policy = build_policy("hsd", s=1, min=0, max=4)
    with layer_skipping(model, policy, max_new_tokens=T):
        assert "generate" in model.__dict__
        out = model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                             return_dict_in_generate=True)
    lengths = [layer.get_seq_length() for layer in output_cache(out).layers]
    final = set(policy.layers(T - 2, T, 6))
    total = enc.input_ids.shape[1] + T - 1
    assert all(lengths[i] == total for i in final)
    assert all(lengths[i] == 0 for i in range(6) if i not in final)  # dropped: no memory, no reorder copies
    assert "generate" not in model.__dict__
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_skipcache_goes_in_under_the_models_cache_argument(tiny, name):
    """transformers < 5.24 names the cache argument past_key_values: the engine follows the model class."""
    model = copy.deepcopy(tiny.model)
    base = type(model)

    def forward(self, input_ids=None, **kwargs):  # the signature is all that matters here
        return base.forward(self, input_ids, **kwargs)

    forward.__signature__ = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                               for p in ("self", "input_ids", name)])
    model.__class__ = type(base.__name__, (base,), {"forward": forward})
    assert cache_argument(model) == name
    engine = SkipEngine(model, build_policy("hsd", s=1, min=0, max=4), max_new_tokens=T)
    engine._orig_generate = lambda *args, **kwargs: kwargs  # what generate() would receive
    passed = engine._generate(max_new_tokens=T)
    assert isinstance(passed[name], SkipCache)
    assert set(passed) & {"cache", "past_key_values"} == {name}


def test_plain_dynamic_cache_is_refused_when_layers_are_skipped(tiny):
    enc = tiny.tokenizer(PROMPTS[:1], return_tensors="pt")
    with layer_skipping(tiny.model, build_policy("hsd", s=1, min=0, max=4), max_new_tokens=T):
        with pytest.raises(ValueError, match="SkipCache"):
            tiny.model.generate(**enc, max_new_tokens=T, **{cache_argument(tiny.model): DynamicCache(config=tiny.model.config)})


def test_one_context_many_calls_each_starts_with_its_prompt(tiny):
    """The evaluation callback keeps one context over every batch: each call must equal a fresh context's."""
    enc = tiny.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    for policy in (build_policy("hsd", s=1, min=0, max=4), build_policy("calm", d=0.05, criterion="state")):
        with layer_skipping(tiny.model, policy, max_new_tokens=T) as stats:
            calls = [tiny.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=False) for _ in range(2)]
            with torch.no_grad():  # a plain forward after generate(): a new prompt, every layer
                inside = tiny.model(calls[0]).logits
        with torch.no_grad():
            outside = tiny.model(calls[0]).logits
        assert torch.equal(calls[0], calls[1])
        assert len(stats.per_step) == 2 * (T - 1)  # decode steps only: no prefill counted as a token
        assert stats.per_step[: T - 1] == stats.per_step[T - 1:]
        assert torch.equal(inside, outside)
        if not policy.static:
            assert [e.step for e in stats.calm_exits] == list(range(T - 1)) * 2


def test_generate_longer_than_the_contexts_tmax_is_refused():
    """layer_skipping(max_new_tokens=4) around generate(max_new_tokens=8) ran T = 4..7 past the schedule's Tmax
    (HSD's band below its min); a call of the context's length or shorter runs the schedule as it is."""
    lm = load("tiny-llama")
    enc = lm.tokenizer(PROMPTS[:1], return_tensors="pt")
    policy = build_policy("hsd", s=1, min=0, max=4)
    with layer_skipping(lm.model, policy, max_new_tokens=4) as stats:
        for longer in ({"max_new_tokens": 8}, {"generation_config": GenerationConfig(max_new_tokens=8)}):
            with pytest.raises(ConfigError, match=r"generate\(max_new_tokens=8\) inside layer_skipping\("
                                                  r"max_new_tokens=4\)") as err:
                lm.model.generate(**enc, do_sample=False, **longer)
            assert "\n" not in str(err.value)
        for n in (4, 3):
            lm.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert stats.step_layers == [policy.layers(t, 4, 6) for t in (0, 1, 2, 0, 1)]  # Tmax = 4 in both calls


def test_cache_less_forwards_outside_generate_each_start_at_their_prompt(tiny):
    """A second plain forward in one context is a new prompt too: every layer, no decode step recorded
    (it once continued the first forward's "generation", skipping layers from the short prompt's length on)."""
    short, long = (tiny.tokenizer(text, return_tensors="pt").input_ids for text in (PROMPTS[1], PROMPTS[2]))
    assert short.shape[1] < long.shape[1]
    with torch.no_grad():
        with layer_skipping(tiny.model, build_policy("hsd", s=1, min=0, max=4), max_new_tokens=T) as stats:
            inside = [tiny.model(ids).logits for ids in (short, long)]
        outside = [tiny.model(ids).logits for ids in (short, long)]
    assert all(torch.equal(a, b) for a, b in zip(inside, outside, strict=True))
    assert stats.per_step == [] and stats.decode_rows == 0
    assert stats.prefill_tokens == short.shape[1] + long.shape[1]


def test_generate_from_a_filled_cache_is_refused(tiny):
    """T counts from the end of the prompt the engine prefilled: a cache filled beforehand has no such prompt."""
    enc = tiny.tokenizer(PROMPTS[:1], return_tensors="pt")
    with layer_skipping(tiny.model, build_policy("hsd", s=1, min=0, max=4), max_new_tokens=T):
        out = tiny.model.generate(**enc, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="must start from an empty cache"):
            tiny.model.generate(out.sequences, max_new_tokens=4, do_sample=False,
                                **{cache_argument(tiny.model): output_cache(out)})


def test_run_layers_captures_a_state_and_feeding_it_back_gives_the_same_logits():
    """The public seam lossless verification uses: ``capture_at=E`` records the state entering layer E + 1 and
    ``feed`` hands it to the range's first layer, so layers E + 1..L alone reproduce the whole forward; forwards
    in a fixed range record no decode step."""
    lm = load("tiny-llama")
    ids = lm.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True).input_ids
    engine = SkipEngine(lm.model, build_policy("hsd", s=1, min=0, max=4), max_new_tokens=T)
    engine.install()
    try:
        with torch.no_grad():
            plain = lm.model(ids, output_hidden_states=True)
            with engine.run_layers(range(6), capture_at=2) as states:
                whole = lm.model(ids).logits
            with engine.run_layers(range(2, 6), feed=states[0]):
                top = lm.model(ids).logits
        with pytest.raises(ValueError, match="needs the layers it feeds"), engine.run_layers(feed=states[0]):
            pass
    finally:
        engine.remove()
    assert len(states) == 1 and torch.equal(states[0], plain.hidden_states[2])  # (B, Q, C) entering layer 3
    assert torch.equal(whole, plain.logits) and torch.equal(top, plain.logits)
    assert engine.stats.per_step == [] and engine.scope is None


def test_nested_contexts_restore_the_outer_one(tiny):
    outer, inner = build_policy("hsd", s=1, min=0, max=4), build_policy("full")
    enc = tiny.tokenizer(PROMPTS[:1], return_tensors="pt")
    with layer_skipping(tiny.model, outer, max_new_tokens=T) as stats:
        with layer_skipping(tiny.model, inner, max_new_tokens=T):
            pass
        tiny.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=False)
    assert stats.per_step and stats.avg_layers < 6  # the outer policy still applied after the inner exit
    assert "generate" not in tiny.model.__dict__
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(tiny.model))


def test_cached_hsd_equals_a_hand_rolled_per_layer_decode():
    """A reference outside the engine: greedy decoding without a cache that recomputes the whole sequence each
    step, layer by layer, position p keeping layer i's output only where i is in its own set
    policy.layers(p - P, Tmax, L) (prompt positions p < P run every layer)."""
    lm = load("tiny-llama")
    model, L = lm.model, 6
    policy = build_policy("hsd", s=1, min=0, max=4, num_layers=L)  # skips layer 1 for every token
    family = layout_of(model)
    layers, norm, head = decoder_layers(model), submodule(model, family.final_norm), submodule(model, family.lm_head)
    rotary = submodule(model, family.stack).rotary_emb
    prompt = lm.tokenizer(PROMPTS[2], return_tensors="pt").input_ids  # (1, P): one row, no padding
    P = prompt.shape[1]
    eos = torch.tensor(model.generation_config.eos_token_id).view(-1)  # min_new_tokens=T bans it below
    seq = prompt
    with torch.no_grad():
        for _ in range(T):
            n = seq.shape[1]
            h = model.get_input_embeddings()(seq)  # (1, n, C)
            pos = torch.arange(n)[None]  # (1, n)
            rope = rotary(h, position_ids=pos)  # (cos, sin), each (1, n, head_dim)
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]  # (1, 1, n, n) causal, additive
            for i, layer in enumerate(layers):
                out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)  # (1, n, C)
                keep = torch.tensor([p < P or i in policy.layers(p - P, T, L) for p in range(n)])  # (n,)
                h = torch.where(keep[None, :, None], out, h)
            logits = head(norm(h[:, -1]))  # (1, V)
            logits[:, eos] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        with layer_skipping(model, policy, max_new_tokens=T):
            cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=T,
                                    min_new_tokens=T, do_sample=False)
    assert torch.equal(cached, seq)


# ------------------------------------------------------------------------------------------------------ CALM
def test_calm_keeps_the_cache_complete_after_every_step(tiny):
    lengths_per_step = []

    def check(module, args, kwargs, output):
        lengths_per_step.append([layer.get_seq_length() for layer in output_cache(output).layers])

    handle = tiny.model.register_forward_hook(check, with_kwargs=True)
    try:
        policy = build_policy("calm", d=0.05, criterion="state")
        out, stats = generate(tiny, policy, 4, 2, use_cache=True, do_sample=False)
    finally:
        handle.remove()
    assert len(lengths_per_step) == T
    for lengths in lengths_per_step:
        assert len(set(lengths)) == 1  # every layer holds K/V for every position
    assert lengths_per_step[-1][0] == out.shape[1] - 1
    assert len(stats.calm_exits) == T - 1


@pytest.mark.parametrize("criterion,d", [("state", 0.05), ("softmax", 0.2)])
@pytest.mark.parametrize("batch,beams", [(4, 1), (2, 4)])
def test_calm_equals_a_no_cache_replay_of_its_exits(tiny, criterion, d, batch, beams):
    """CALM's exactness: its cached run == a no-cache reference that recomputes the whole sequence each step,
    every position running layers 1..its recorded exit and only passing its state on above (where the
    reference's upper layers compute K/V from that state, as propagation writes them)."""
    cached, stats = generate(tiny, build_policy("calm", d=d, criterion=criterion), batch, beams, use_cache=True,
                             do_sample=False)
    exits = tuple(e.exit_layer for e in stats.calm_exits)
    assert min(exits) < 6  # some tokens exited early, or the replay proves nothing
    reference, ref_stats = generate(tiny, Replay(exits=exits), batch, beams, use_cache=False, do_sample=False)
    assert torch.equal(cached, reference)
    assert ref_stats.per_step == list(exits)


@pytest.mark.parametrize("criterion,d", [("state", 0.05), ("softmax", 0.2)])
def test_calm_exits_follow_the_threshold(tiny, criterion, d):
    policy = build_policy("calm", d=d, criterion=criterion)
    _, stats = generate(tiny, policy, 4, 1, use_cache=True, do_sample=False)
    for e in stats.calm_exits:
        lam = [policy.threshold(i, e.step, T) for i in range(1, len(e.confidences) + 1)]
        assert e.thresholds == pytest.approx(lam)
        below = e.confidences[:-1] if e.exit_layer < 6 else e.confidences
        assert all(c < t for c, t in zip(below, lam, strict=False))  # no earlier layer was confident
        if e.exit_layer < 6:
            assert e.confidences[-1] >= lam[-1]
            assert len(e.confidences) == e.exit_layer  # first_exit=1: one confidence per layer run
    assert stats.per_step == [e.exit_layer for e in stats.calm_exits]


def test_calm_confidence_matches_an_independent_forward(tiny):
    """Step 0's hidden-state saturation, recomputed from a plain forward's hidden states."""
    policy = build_policy("calm", d=0.05, criterion="state")
    enc = tiny.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with layer_skipping(tiny.model, policy, max_new_tokens=T) as stats:
        out = tiny.model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    seq = out[:, : enc.input_ids.shape[1] + 1]  # prompt + generated token 0 (the one step 0 processes)
    mask = torch.cat([enc.attention_mask, torch.ones_like(seq[:, -1:])], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hs = tiny.model(seq, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
    first = stats.calm_exits[0]
    for i, conf in enumerate(first.confidences, start=1):
        cos = torch.nn.functional.cosine_similarity(hs[i][:, -1], hs[i - 1][:, -1], dim=-1).min().item()
        assert conf == pytest.approx(cos, abs=1e-5)


# ------------------------------------------------------------------------------------------------ smollm2
@pytest.mark.slow
@pytest.mark.parametrize("name,params", PAPER_GRID + ABLATIONS)
@pytest.mark.parametrize("batch,beams", [(1, 1), (4, 1), (1, 4), (4, 4)])
def test_smollm2_cached_equals_reference(name, params, batch, beams):
    """Every paper setting (and the keep_first ablation) on the real 30-layer model."""
    lm = load("smollm2-135m")
    policy = build_policy(name, num_layers=30, **params)
    cached, stats = generate(lm, policy, batch, beams, use_cache=True, do_sample=False)
    reference, _ = generate(lm, policy, batch, beams, use_cache=False, do_sample=False)
    assert torch.equal(cached, reference)
    assert stats.avg_layers == 30 if name == "full" else stats.avg_layers < 30
