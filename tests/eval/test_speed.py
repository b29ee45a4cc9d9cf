"""hsd_exp.eval.speed: per-step timing summed over batches, the FLOP ideal of the layers run, a lossless run's
layer forwards per committed token (counted here by hooks on the model, not by the code's own counters)."""

from __future__ import annotations

import pytest
import torch

from hsd_exp.eval.speed import SPEED_KEYS, SpeedLog, flop_ideal, lossless_layer_forwards
from hsd_exp.models.layout import decoder_layers
from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.lossless import LosslessSettings
from hsd_exp.skip.policies import build_policy
from hsd_exp.train.module import GeneratedBatch

from helpers import load

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(steps: int, decode: float, prefill: float = 0.1, tokens: int = 10, seconds: float = 1.0):
    return GeneratedBatch([], [], tokens, seconds, [], prefill_seconds=prefill, decode_steps=steps,
                          decode_seconds=decode)


def test_ms_per_step_weights_batches_by_their_steps():
    """4 steps in 0.4 s and 1 step in 0.3 s: 0.7 s / 5 steps = 140 ms (not the batches' mean, 200 ms)."""
    log = SpeedLog()
    log.add(batch(4, 0.4, prefill=0.2), prompt_len=10)
    log.add(batch(1, 0.3, prefill=0.4), prompt_len=20)
    summary = log.summary()
    assert summary["ms_per_step"] == pytest.approx(140.0) and summary["prefill_ms"] == pytest.approx(300.0)
    assert summary["tokens_per_s"] == pytest.approx(10.0) and summary["decode_steps"] == 5
    assert log.context == pytest.approx(((10 + 2) * 4 + (20 + 0.5) * 1) / 5)


def test_a_lossless_batch_has_no_steps_and_ranks_merge_at_the_slowest_rank():
    log = SpeedLog()
    log.add(GeneratedBatch([], [], 8, 2.0, []), prompt_len=5)  # no StepTimer rode along
    assert log.summary()["ms_per_step"] is None and log.summary()["prefill_ms"] is None
    other = SpeedLog(tokens=8, seconds=3.0)
    merged = SpeedLog.merged([log.as_list(), other.as_list()])
    assert len(log.as_list()) == len(SPEED_KEYS) and merged.tokens == 16 and merged.seconds == 3.0


def test_flop_ideal_is_the_full_depth_cost_over_the_layers_each_step_ran():
    """tiny-llama (6 equal layers): ideal = T (6 (f + 4cd) + h) / sum_t (n_t (f + 4cd) + h), n_t = the HSD set's
    size at step t, f = 2 * one layer's parameters, h = 2 d V, counted here from the model."""
    lm = load("tiny-llama")
    model, tok = lm.model, lm.tokenizer
    policy = build_policy("hsd", s=1, min=0, max=3)
    enc = tok(["name[The Eagle], food[French]"], return_tensors="pt")
    with layer_skipping(model, policy, max_new_tokens=8) as stats:
        model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    f = 2 * sum(p.numel() for p in decoder_layers(model)[0].parameters())
    d, vocab = model.config.hidden_size, model.config.vocab_size
    c = 20.0
    sizes = [len(policy.layers(t, 8, 6)) for t in range(7)]  # 8 tokens: decode steps T = 0..6
    want = 7 * (6 * (f + 4 * c * d) + 2 * d * vocab) / sum(n * (f + 4 * c * d) + 2 * d * vocab for n in sizes)
    assert flop_ideal(model, stats, c) == pytest.approx(want)
    assert 1.0 < want < 6 / (sum(sizes) / 7)  # the head keeps it under the layer ratio
    assert flop_ideal(model, None, c) == 1.0  # plain decoding


@pytest.mark.parametrize(("name", "params"), [("hsd", {"s": 1, "min": 0, "max": 3}),
                                             ("early_exit", {"layer": 3})])  # E = 3 exact bottom layers
def test_lossless_layer_forwards_count_what_ran_per_committed_token(name, params):
    """Each decoder layer's MLP runs once per forward that runs the layer (on one position or k + 1): hooks
    count them. Without the prefill's 6, over the tokens committed after it, they are layer_forwards_per_token
    (an early exit's verifications run layers 4..6 and d_k's own pass through 1..3)."""
    lm = load("tiny-llama")
    model, tok = lm.model, lm.tokenizer
    calls = [0]
    hooks = [layer.mlp.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for layer in decoder_layers(model)]
    enc = tok(["name[The Eagle], food[French]"], return_tensors="pt")
    try:
        with layer_skipping(model, build_policy(name, **params), max_new_tokens=10,
                            lossless=LosslessSettings(draft_len=3)) as stats:
            out = model.generate(**enc, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    finally:
        for hook in hooks:
            hook.remove()
    generated = out.shape[1] - enc["input_ids"].shape[1]
    assert generated == 10 and stats.lossless.committed == generated - 1  # token 0 is the prefill's
    assert lossless_layer_forwards(stats) == pytest.approx((calls[0] - 6) / (generated - 1))
    assert lossless_layer_forwards(None) is None
    assert torch.equal(out, model.generate(**enc, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                           pad_token_id=tok.pad_token_id))  # and it stayed lossless
