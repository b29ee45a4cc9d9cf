"""The benchmark's FLOP model (hsd_exp.bench): what each generate() call computes, layer by layer, so the
ideal speedup counts exactly what the engine runs (formulas in hsd_exp.bench's docstring).

Beyond the static policies: a per-token policy's step (``routed_step_flops``: a layer all rows run, none run
(K/V only), or some run (attention for all, MLP for the running rows)), and lossless mode's drafts and
verifications (``lossless_decode_flops``; ``lossless_bound_flops``: each verify forward
counted once, the cost an upper bound on speedup divides by)."""

from __future__ import annotations

from hsd_exp.models.layout import decoder_layers, layout_of
from hsd_exp.skip.stats import SkipStats


def layer_flops(model) -> tuple[list[int], list[int], int, int]:
    """(2 * params of each decoder layer, 2 * params of its attention block, hidden size d, vocabulary V)."""
    text = model.config.get_text_config()
    attn = layout_of(model).attn
    layers = decoder_layers(model)
    per_layer = [2 * sum(p.numel() for p in layer.parameters()) for layer in layers]
    per_attn = [2 * sum(p.numel() for p in getattr(layer, attn).parameters()) for layer in layers]
    return per_layer, per_attn, text.hidden_size, text.vocab_size


def prefill_flops(model, prompt_len: int, rows: int) -> float:
    """FLOPs of the prompt pass: every layer on every prompt position, the LM head on the last one."""
    per_layer, _, d, vocab = layer_flops(model)
    attn = 2 * prompt_len * (prompt_len + 1) * d  # sum over positions p < Pr of 4 * (p + 1) * d
    return float(rows * (sum(prompt_len * f + attn for f in per_layer) + 2 * d * vocab))


def call_flops(model, prompt_len: int, rows: int, new_tokens: int, stats: SkipStats | None) -> float:
    """FLOPs of one generate() call; ``stats`` None = plain generate (every layer every step)."""
    return prefill_flops(model, prompt_len, rows) + decode_flops(model, prompt_len, rows, new_tokens, stats)


def kv_only_flops(model) -> list[int]:
    """What a token that skips each layer still computes to write its K/V (hsd_exp.skip.partial): the K and V
    projections where the family has a K/V-only path (LLaMA layout), else the whole attention block (whose
    attention over the context the caller adds)."""
    layout = layout_of(model)
    if not layout.kv_rope:
        return layer_flops(model)[1]
    out = []
    for layer in decoder_layers(model):
        attn = getattr(layer, layout.attn)
        out.append(2 * sum(p.numel() for m in (attn.k_proj, attn.v_proj) for p in m.parameters()))
    return out


def decode_flops(model, prompt_len: int, rows: int, new_tokens: int, stats: SkipStats | None) -> float:
    """FLOPs of the decode steps of one generate() call (what a policy changes)."""
    per_layer, per_attn, d, vocab = layer_flops(model)
    L = len(per_layer)
    if stats is not None and stats.layer_rows:  # a per-token policy: what the engine ran, layer by layer
        return float(sum(routed_step_flops(model, prompt_len + t + 1, rows, stats.layer_rows[t])
                         for t in range(new_tokens - 1)))
    kv, kv_rope = kv_only_flops(model), layout_of(model).kv_rope
    total = 0
    for t in range(new_tokens - 1):  # decode steps process generated tokens 0..new_tokens-2
        ctx = prompt_len + t + 1
        run = range(L) if stats is None else stats.step_layers[t]
        step = sum(per_layer[i] + 4 * ctx * d for i in run) + 2 * d * vocab
        if stats is not None and stats.kv_only[t]:  # CALM: the layers above the exit write K/V (propagation)
            step += sum(kv[i] if kv_rope else per_attn[i] + 4 * ctx * d for i in range(L - stats.kv_only[t], L))
        if stats is not None:  # CALM: one LM-head (softmax) or cosine per confidence check
            step += stats.confidence_evals[t] * 2 * d * vocab
        total += rows * step
    return float(total)


def routed_step_flops(model, ctx: int, rows: int, layer_rows: tuple[int, ...]) -> float:
    """One decode step of a per-token policy (SkipLayer), as the engine runs it, layer by layer: all ``rows`` run
    it (the whole layer), none (K/V only: ``kv_only_flops``), or some (the attention block for every row, the
    MLP for the running ones)."""
    per_layer, per_attn, d, vocab = layer_flops(model)
    kv, kv_rope = kv_only_flops(model), layout_of(model).kv_rope
    step = rows * 2 * d * vocab
    for i, ran in enumerate(layer_rows):
        attention = per_attn[i] + 4 * ctx * d  # the attention block of one row, its context included
        if ran == rows:
            step += rows * (per_layer[i] + 4 * ctx * d)
        elif ran == 0:
            step += rows * (kv[i] if kv_rope else attention)
        else:
            step += rows * attention + ran * (per_layer[i] - per_attn[i])
    return float(step)


def _draft_flops(model, ctx: int, rows: int, stats: SkipStats) -> float:
    """Every draft forward of a lossless call, as ``decode_flops`` counts a decode step under the policy."""
    per_layer, per_attn, d, vocab = layer_flops(model)
    kv, kv_rope = kv_only_flops(model), layout_of(model).kv_rope
    L = len(per_layer)
    if stats.layer_rows:  # a router drafts
        return float(sum(routed_step_flops(model, ctx, rows, layer_rows) for layer_rows in stats.layer_rows))
    # a static policy (skipped layers write nothing) or CALM (the layers above the exit write K/V)
    return float(rows * sum(sum(per_layer[i] + 4 * ctx * d for i in run) + 2 * d * vocab * (1 + evals)
                            + sum(kv[i] if kv_rope else per_attn[i] + 4 * ctx * d for i in range(L - extra, L))
                            for run, extra, evals in zip(stats.step_layers, stats.kv_only, stats.confidence_evals,
                                                         strict=True)))


def _verify_flops(model, ctx: int, rows: int, stats: SkipStats, positions: int) -> float:
    """Verification: layers E+1..L and the LM head on ``positions`` positions, plus the last draft's pass through
    the exact bottom layers 1..E (E = 0 when the drafts skip a bottom layer: every layer verifies)."""
    per_layer, _, d, vocab = layer_flops(model)
    E, runs = stats.lossless.exact_bottom, stats.lossless.verifications
    verify = rows * positions * (sum(f + 4 * ctx * d for f in per_layer[E:]) + 2 * d * vocab)
    bottom = rows * runs * sum(f + 4 * ctx * d for f in per_layer[:E])
    return float(verify + bottom)


def lossless_decode_flops(model, prompt_len: int, rows: int, new_tokens: int, stats: SkipStats) -> float:
    """Lossless mode's decode FLOPs: every draft forward under the policy (as ``decode_flops`` counts a step)
    plus every verify forward (the layers above the drafts' exact bottom on k + 1 positions), context at the
    call's mid-point. A FLOP count, not a time bound: see ``lossless_bound_flops``."""
    ctx = prompt_len + new_tokens // 2
    verified = stats.lossless.drafted + stats.lossless.verifications  # positions: k + 1 per verification
    return _draft_flops(model, ctx, rows, stats) + _verify_flops(model, ctx, rows, stats, verified)


def lossless_bound_flops(model, prompt_len: int, rows: int, new_tokens: int, stats: SkipStats) -> float:
    """The least a lossless call's decode can cost, for an upper bound on its speedup: as
    ``lossless_decode_flops``, but each verify forward costs a one-position forward at its depth
    (V_n forwards of layers E+1..L and the LM head, whatever their k + 1 positions).

    A forward over n positions reads its weights once, and at decode sizes that read, not the multiply-adds,
    sets its time, so n positions cost at least (and on a CPU or GPU at batch 1 about) what one costs. Counting
    k + 1 positions per verification made the old "ideal" a lower bound on speed, which measured runs beat by
    1.3-1.9x. Formula with symbols: docs/bench.md, "The lossless bound"."""
    ctx = prompt_len + new_tokens // 2
    return _draft_flops(model, ctx, rows, stats) + _verify_flops(model, ctx, rows, stats,
                                                                  stats.lossless.verifications)


__all__ = ["call_flops", "decode_flops", "kv_only_flops", "layer_flops", "lossless_bound_flops",
           "lossless_decode_flops", "prefill_flops", "routed_step_flops"]
