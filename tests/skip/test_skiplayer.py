"""SkipLayer through the engine: cached decoding equals a no-cache reference in which every position runs, per
layer, exactly what the router decided for it; the cache stays complete; rows decide apart; gradients flow."""

import pytest
import torch

from hsd_exp import SkipRouter, build_policy, layer_skipping
from hsd_exp.errors import ConfigError
from hsd_exp.models.layout import decoder_layers

from helpers import PROMPTS, load, output_cache

T = 10


def random_router(lm, seed=0, std=0.3, **kw):
    """A router whose gates disagree between tokens and rows (a trained one would too): about half run."""
    torch.manual_seed(seed)
    router = SkipRouter.for_model(lm.model, kind="linear", init_bias=0.0, **kw)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=std)
    return router.eval()


def generate(lm, policy, batch, use_cache, **kw):
    enc = lm.tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    with layer_skipping(lm.model, policy, max_new_tokens=T) as stats:
        out = lm.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, use_cache=use_cache,
                                return_dict_in_generate=True, **kw)
    return out, stats


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["greedy", "beam4", "sample"])
def test_cached_equals_the_no_cache_reference(tiny, batch, mode):
    kw = {"greedy": {}, "beam4": {"num_beams": 4}, "sample": {"do_sample": True, "top_k": 0}}[mode]
    policy = build_policy("skiplayer", router=random_router(tiny))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(1)  # sampling draws the same numbers in both runs
        out, stats = generate(tiny, policy, batch, use_cache, **kw)
        outs.append(out.sequences)
    assert torch.equal(outs[0], outs[1])
    L = len(decoder_layers(tiny.model))
    assert 0 < stats.avg_layers < L  # the router really skips, and really runs


def test_rows_decide_apart_and_the_cache_stays_complete(tiny):
    policy = build_policy("skiplayer", router=random_router(tiny))
    out, stats = generate(tiny, policy, 3, use_cache=True)
    assert any(len(set(step)) > 1 for step in stats.last_call_rows)  # rows ran different numbers of layers
    cache = output_cache(out)
    lengths = {layer.get_seq_length() for layer in cache.layers}
    assert len(lengths) == 1  # every layer wrote K/V for every position: skipped tokens too


def test_a_dense_router_is_full_decoding(tiny):
    router = SkipRouter.for_model(tiny.model, init_bias=8.0).eval()  # p ~ 1: every layer runs
    enc = tiny.tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    plain = tiny.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=False)
    with layer_skipping(tiny.model, build_policy("skiplayer", router=router), max_new_tokens=T) as stats:
        routed = tiny.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=False)
    assert torch.equal(plain, routed)
    assert stats.avg_layers == len(decoder_layers(tiny.model))


def test_the_threshold_trades_depth_without_retraining():
    lm = load("tiny-llama")
    router = random_router(lm)
    depth = [generate(lm, build_policy("skiplayer", router=router, threshold=t), 3, True)[1].avg_layers
             for t in (0.3, 0.5, 0.7)]
    assert depth[0] > depth[1] > depth[2]


def test_training_routes_target_positions_and_the_gradient_reaches_the_router():
    lm = load("tiny-llama")
    router = random_router(lm).train()
    enc = lm.tokenizer(["a b c d e f g h"], return_tensors="pt")
    with layer_skipping(lm.model, build_policy("skiplayer", router=router), max_new_tokens=T, prompt_len=4):
        loss = lm.model(**enc, labels=enc["input_ids"]).loss
    step = router.last_step
    assert step.generated.tolist() == [False] * 4 + [True] * (enc["input_ids"].shape[1] - 4)
    for z in step.gates.values():  # prompt positions always run
        assert z[:, :4].eq(1).all()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
    lm.model.zero_grad(set_to_none=True)


def test_a_token_that_skips_still_tells_its_gate_what_running_would_have_changed():
    """out = h + z * (layer(h) - h): the gradient reaches the gate at skipped tokens too (else a layer that
    every token skips never learns to run again)."""
    lm = load("tiny-llama")
    router = SkipRouter.for_model(lm.model, init_bias=-8.0).train()  # every generated token skips every layer
    enc = lm.tokenizer(["a b c d e f g h"], return_tensors="pt")
    with layer_skipping(lm.model, build_policy("skiplayer", router=router), max_new_tokens=T, prompt_len=4):
        loss = lm.model(**enc, labels=enc["input_ids"]).loss
    assert all(z[:, 4:].eq(0).all() for z in router.last_step.gates.values())
    loss.backward()
    assert all(gate.net[-1].bias.grad.abs() > 0 for gate in router.gates.values())
    lm.model.zero_grad(set_to_none=True)


def test_skiplayer_needs_a_router_and_a_threshold_in_range():
    lm = load("tiny-gpt2")
    enc = lm.tokenizer(["hello"], return_tensors="pt")
    with pytest.raises(ConfigError, match="needs a trained router"), \
            layer_skipping(lm.model, build_policy("skiplayer"), max_new_tokens=4):
        lm.model.generate(**enc, max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"policy.threshold=1 is out of range: must be in \(0, 1\)"):
        build_policy("skiplayer", threshold=1)
    assert build_policy("skiplayer", threshold=0.4).label == "skiplayer(threshold=0.4)"


@pytest.mark.slow
@pytest.mark.parametrize("batch,beams", [(1, 1), (3, 1), (3, 4)])
def test_smollm2_cached_equals_the_no_cache_reference(batch, beams):
    """The real 30-layer model with a router that skips about half of its layers."""
    lm = load("smollm2-135m")
    policy = build_policy("skiplayer", router=random_router(lm, std=0.05))
    cached, stats = generate(lm, policy, batch, use_cache=True, num_beams=beams, do_sample=False)
    reference, _ = generate(lm, policy, batch, use_cache=False, num_beams=beams, do_sample=False)
    assert torch.equal(cached.sequences, reference.sequences)
    assert 0 < stats.avg_layers < 30
