"""The FLOP model (hsd_exp.flops): what each generate() call computes, layer by layer, the bench's ideal speedup."""

import pytest

from hsd_exp.flops import (
    call_flops,
    decode_flops,
    kv_only_flops,
    layer_flops,
    lossless_bound_flops,
    lossless_decode_flops,
    prefill_flops,
    routed_step_flops,
)
from hsd_exp.skip.policies import build_policy
from hsd_exp.skip.stats import SkipStats

from helpers import load

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flops_of_plain_decoding_follow_the_formula():
    lm = load("tiny-llama")
    per_layer, _, d, vocab = layer_flops(lm.model)
    P, R, N = 5, 3, 4  # prompt length, rows, new tokens
    # every prompt position p runs every layer and attends to p + 1 positions; logits for the last only
    prefill = R * sum(f + 4 * (p + 1) * d for f in per_layer for p in range(P)) + R * 2 * d * vocab
    decode = sum(R * (sum(f + 4 * (P + t + 1) * d for f in per_layer) + 2 * d * vocab) for t in range(N - 1))
    assert prefill_flops(lm.model, P, R) == prefill
    assert decode_flops(lm.model, P, R, N, None) == decode
    assert call_flops(lm.model, P, R, N, None) == prefill + decode


def test_ideal_speedup_counts_only_the_layers_run():
    lm = load("tiny-llama")
    L, N = 6, 8
    full = SkipStats(num_layers=L, step_layers=[tuple(range(L))] * (N - 1), kv_only=[0] * (N - 1),
                     confidence_evals=[0] * (N - 1))
    assert call_flops(lm.model, 5, 2, N, full) == call_flops(lm.model, 5, 2, N, None)
    policy = build_policy("hsd", s=1, min=0, max=4)
    sets = [policy.layers(t, N, L) for t in range(N - 1)]
    hsd = SkipStats(num_layers=L, step_layers=sets, kv_only=[0] * (N - 1), confidence_evals=[0] * (N - 1))
    saved = call_flops(lm.model, 5, 2, N, None) - call_flops(lm.model, 5, 2, N, hsd)
    per_layer, _, d, _ = layer_flops(lm.model)
    expected = sum(2 * (per_layer[i] + 4 * (5 + t + 1) * d) for t, run in enumerate(sets)
                   for i in range(L) if i not in run)
    assert saved == expected > 0
    assert saved == decode_flops(lm.model, 5, 2, N, None) - decode_flops(lm.model, 5, 2, N, hsd)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_flops_of_a_routed_step_are_what_the_engine_runs(name):
    """Per layer: every row runs it (the whole layer), none (K/V projections on LLaMA, the attention block
    elsewhere), or some (the attention block for all rows, the MLP for the running ones)."""
    lm = load(name)
    per_layer, per_attn, d, vocab = layer_flops(lm.model)
    kv = kv_only_flops(lm.model)
    ctx, rows, head = 9, 4, 4 * 2 * d * vocab
    attention = [a + 4 * ctx * d for a in per_attn]
    assert routed_step_flops(lm.model, ctx, rows, (4,) * 6) == head + 4 * sum(f + 4 * ctx * d for f in per_layer)
    skip = kv if name == "tiny-llama" else attention
    assert routed_step_flops(lm.model, ctx, rows, (0,) * 6) == head + 4 * sum(skip)
    if name == "tiny-llama":  # K and V projections only: d x (kv heads x head dim) each, no bias
        c = lm.model.config
        assert kv == [2 * 2 * d * c.num_key_value_heads * (d // c.num_attention_heads)] * 6
    mixed = routed_step_flops(lm.model, ctx, rows, (1,) + (4,) * 5)
    assert mixed == head + 4 * attention[0] + (per_layer[0] - per_attn[0]) + 4 * sum(
        f + 4 * ctx * d for f in per_layer[1:])
    stats = SkipStats(num_layers=6, layer_rows=[(1,) + (4,) * 5] * 2)  # decode_flops uses them per step
    assert decode_flops(lm.model, ctx - 1, rows, 3, stats) == routed_step_flops(
        lm.model, ctx, rows, (1,) + (4,) * 5) + routed_step_flops(lm.model, ctx + 1, rows, (1,) + (4,) * 5)


@pytest.mark.parametrize("exact_bottom", [0, 2])
def test_lossless_flops_count_each_draft_step_and_each_verified_position(exact_bottom):
    """Drafts: one step per draft forward (its layers, the LM head); verification: layers E+1..L and the head on
    k + 1 positions per round, plus the last draft's pass through the exact bottom layers 1..E."""
    from hsd_exp.skip.lossless import LosslessStats

    lm = load("tiny-llama")
    per_layer, _, d, vocab = layer_flops(lm.model)
    L, P, rows, N = 6, 5, 2, 9
    runs = [(0, 1, 4, 5), (0, 1, 5)]  # the layers of two draft forwards
    stats = SkipStats(num_layers=L, step_layers=runs, kv_only=[0, 0], confidence_evals=[0, 0])
    stats.lossless = LosslessStats(drafted=2, verifications=1, exact_bottom=exact_bottom)
    ctx = P + N // 2
    draft = rows * sum(sum(per_layer[i] + 4 * ctx * d for i in run) + 2 * d * vocab for run in runs)
    verify = rows * 3 * (sum(f + 4 * ctx * d for f in per_layer[exact_bottom:]) + 2 * d * vocab)
    bottom = rows * sum(f + 4 * ctx * d for f in per_layer[:exact_bottom])
    assert lossless_decode_flops(lm.model, P, rows, N, stats) == draft + verify + bottom
    if exact_bottom:  # verifying above E costs less than at full depth, by the bottom layers' k positions
        full = LosslessStats(drafted=2, verifications=1, exact_bottom=0)
        stats.lossless = full
        assert lossless_decode_flops(lm.model, P, rows, N, stats) > draft + verify + bottom


@pytest.mark.parametrize("exact_bottom", [0, 2])
def test_the_lossless_bound_counts_each_verify_forward_once(exact_bottom):
    """A forward over k + 1 positions reads its weights once: the bound charges each verification what a
    one-position forward at its depth costs (layers E+1..L and the head, plus the bottom-only pass), so measured
    speed cannot beat it; the FLOP count (k + 1 positions each) measured runs beat by 1.3-1.9x."""
    from hsd_exp.skip.lossless import LosslessStats

    lm = load("tiny-llama")
    per_layer, _, d, vocab = layer_flops(lm.model)
    L, P, rows, N = 6, 5, 2, 9
    runs = [(0, 1, 4, 5)] * 6 + [(0, 1, 5)] * 2  # 8 draft forwards, 4 per round
    stats = SkipStats(num_layers=L, step_layers=runs, kv_only=[0] * 8, confidence_evals=[0] * 8)
    stats.lossless = LosslessStats(drafted=8, verifications=2, exact_bottom=exact_bottom)
    ctx = P + N // 2
    draft = rows * sum(sum(per_layer[i] + 4 * ctx * d for i in run) + 2 * d * vocab for run in runs)
    top = sum(f + 4 * ctx * d for f in per_layer[exact_bottom:]) + 2 * d * vocab
    bottom = rows * 2 * sum(f + 4 * ctx * d for f in per_layer[:exact_bottom])
    assert lossless_bound_flops(lm.model, P, rows, N, stats) == draft + rows * 2 * top + bottom
    # the FLOP count charges the 8 drafted positions on top: the bound is lower by exactly that
    assert lossless_decode_flops(lm.model, P, rows, N, stats) - lossless_bound_flops(lm.model, P, rows, N, stats) \
        == rows * 8 * top
