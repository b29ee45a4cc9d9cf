"""Lossless mode's loop: rounds of draft, verify, accept and commit over one cache (the method and its settings:
hsd_exp.skip.lossless).

    prefill  every layer over the prompt x; token 0 = pick(p(. | x))
    round    drafts  = draft.draft(x_n, k)                  k tokens (hsd_exp.skip.drafts)
             logits  = verify(x_n, d_1..d_k)                every layer, or layers E+1..L on the drafts' states
             m, c    = choose.accept(drafts, logits)        (hsd_exp.skip.choose)
             commit d_1..d_a, c_{a+1} (a = min over unfinished rows of m); cut the cache back to them

The loop reaches the engine through ``engine.run_layers`` alone (which layers a forward runs; the states captured
and fed at layer E); ``Forwards`` runs the model on the call's cache with the positions and mask generate() uses.

generate()'s own hooks are applied as it applies them, so the output stays plain generate()'s with them: the call's
logits processors score every position (prefill, drafts, verification) after min_new_tokens and before the
sampling warpers, given the tokens before that position (so they must be functions of (input_ids, scores): one
that counts its calls counts drafted and verified positions, not tokens); stopping criteria (the call's, and
stop_strings / max_time from the config) run after each committed token and finish the rows they stop; a streamer
gets the prompt, then each committed token (B,), then ``end()``.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxTimeCriteria, StopStringCriteria

from hsd_exp.errors import ConfigError
from hsd_exp.skip.cache import SkipCache
from hsd_exp.skip.choose import Chooser
from hsd_exp.skip.drafts import PolicyDraft
from hsd_exp.skip.lossless import LosslessSettings, LosslessStats


class Forwards:
    """The model's forwards over one call's cache: left-padded rows, positions and mask as generate() builds them.
    Which layers run is the engine's (``run_layers``); this only feeds the positions after the cached ones."""

    def __init__(self, engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        self.model, self.stack, self.cache_kw = engine.model, engine.stack, engine.cache_kw
        self.B, self.P = input_ids.shape
        self.prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # (B, P)
        self.sequence = input_ids  # (B, P + g): the committed tokens (the last one not in the cache yet)
        self.cache = SkipCache(config=engine.model.config)
        self.cache.activate_past_recording()  # sliding-window layers (Gemma-3) keep what truncate() may go back to

    def __call__(self, ids: torch.Tensor, head: bool = True) -> torch.Tensor | None:
        """Logits (B, q, V) for ``ids`` (B, q), the positions right after the cached ones; ``head`` False runs the
        decoder stack alone (no logits)."""
        q, c = ids.shape[1], self.cache.get_seq_length()
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(self.B, c + q - self.P)], dim=1)  # (B, c + q)
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]  # generate()'s position ids
        out = (self.model if head else self.stack)(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                   use_cache=True, **{self.cache_kw: self.cache})
        return out.logits if head else None  # (B, q, V)


def verify(engine, forwards: Forwards, ids: torch.Tensor, n: int, states: list, E: int,
           stats: LosslessStats) -> torch.Tensor:
    """The full model's logits (B, k + 1, V) for ``ids`` = x_n, d_1..d_k; the cache holds n committed positions
    (plus, below layer E + 1, the drafts' x_n, d_1..d_{k-1}, whose states entering it are ``states``)."""
    cache, L = forwards.cache, engine.L
    stats.verifications += 1
    if not E:  # full depth: every layer from the committed positions on
        cache.truncate(n)  # back to the full model's K/V (the drafts' are the policy's)
        stats.verified_layers += L
        with engine.run_layers(range(L)):
            return forwards(ids)
    cache.truncate(n, first=E)  # above E, back to the full model's K/V; below, the drafts' are the full model's
    with engine.run_layers(range(E), capture_at=E) as last:
        forwards(ids[:, -1:], head=False)  # d_k (x_n if k = 0) through the bottom layers: its K/V and state
    feed = torch.cat([*states, *last], dim=1)  # (B, k + 1, C): the states of x_n, d_1..d_k entering layer E + 1
    cache.count_from = E  # the verified positions come right after the n committed ones of layers E + 1..
    try:
        stats.verified_layers += L - E
        with engine.run_layers(range(E, L), feed=feed):
            return forwards(ids)
    finally:
        cache.count_from = 0


def stopping(gen: GenerationConfig, criteria, tokenizer) -> StoppingCriteriaList:
    """The call's stopping criteria, with generate()'s own for ``stop_strings`` and ``max_time`` (EOS and the
    length the rounds check themselves)."""
    out = StoppingCriteriaList()
    if gen.max_time is not None:
        out.append(MaxTimeCriteria(max_time=gen.max_time))
    if gen.stop_strings is not None:
        if tokenizer is None:
            raise ConfigError(f"stop_strings={gen.stop_strings!r} needs the tokenizer: pass "
                              "generate(..., tokenizer=tokenizer), as plain generate() requires")
        out.append(StopStringCriteria(stop_strings=gen.stop_strings, tokenizer=tokenizer))
    return StoppingCriteriaList([*out, *(criteria or [])])


def lossless_generate(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      gen: GenerationConfig, settings: LosslessSettings, draft_class=PolicyDraft,
                      logits_processor=None, stopping_criteria=None, streamer=None, tokenizer=None) -> torch.Tensor:
    """``generate()`` of ``engine.model`` (greedy or sampling): (B, P + new). ``draft_class`` (a DraftStrategy,
    hsd_exp.skip.drafts; default: drafts under ``engine.policy``) is built once per call as
    ``draft_class(engine, forwards, choose, settings, stats, steps=max_new_tokens)``. generate()'s
    ``logits_processor``, ``stopping_criteria``, ``streamer`` (and ``tokenizer`` for stop_strings) are applied as
    the module docstring says. Counts go into ``engine.stats.lossless``."""
    stats = engine.stats.lossless
    B, P = input_ids.shape
    eos = [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id or [])
    eos_ids = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
    limit = gen.max_new_tokens
    if gen.min_length and gen.min_length > P:  # min_length counts the prompt: EOS masked while P + index < it
        gen.min_new_tokens = max(gen.min_new_tokens or 0, gen.min_length - P)  # gen is this call's own copy
    choose = Chooser(gen, eos, LogitsProcessorList(logits_processor or []))
    stop = stopping(gen, stopping_criteria, tokenizer)
    forwards = Forwards(engine, input_ids, attention_mask)
    draft = draft_class(engine, forwards, choose, settings, stats, steps=limit)
    E = stats.exact_bottom = draft.exact_bottom  # 0: verify at full depth
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def commit(tok: torch.Tensor, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Append generated token ``tok`` (B,) (pad in finished rows), chosen from ``logits`` (B, V); the rows done
        after it (EOS, or a stopping criterion)."""
        before, index = forwards.sequence, forwards.sequence.shape[1] - P
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        forwards.sequence = torch.cat([before, tok[:, None]], dim=1)  # (B, P + index + 1)
        if streamer is not None:
            streamer.put(tok.cpu())
        done = done | torch.isin(tok, eos_ids)
        if stop:  # generate() hands its criteria the scores it chose from
            done = done | stop(forwards.sequence, choose.scores(logits, index, before))
        return done

    with engine.run_layers(range(engine.L)):  # the prefill, every layer: token 0
        logits = forwards(input_ids)[:, -1]  # (B, V)
        first, _ = choose.pick(logits, 0, input_ids)
    done = commit(first, logits, torch.zeros_like(first, dtype=torch.bool))  # (B,) rows past their EOS
    g = 1  # generated tokens so far; the last one is not in the cache yet
    while g < limit and not done.all():
        n = P + g - 1  # committed positions with K/V in the cache
        last = forwards.sequence[:, -1]  # (B,)
        drafts = draft.draft(last, min(settings.draft_len, limit - g - 1), g, done)
        k = len(drafts.tokens)
        logits = verify(engine, forwards, torch.stack([last, *drafts.tokens], dim=1), n, drafts.states, E,
                        stats)  # (B, k + 1, V)
        proposed = torch.stack(drafts.tokens, dim=1) if k else last.new_empty(B, 0)  # (B, k)
        m, targets = choose.accept(proposed, drafts.qs, logits, g, forwards.sequence)
        a = int(torch.where(done, torch.full_like(m, k), m).min())  # finished rows do not hold the batch back
        stats.drafted += k
        stats.accepted += a
        stats.committed += a + 1
        forwards.cache.truncate(n + a + 1)  # keep x_n, d_1..d_a (the full model's K/V); c_{a+1} is fed next round
        for j in range(a + 1):
            done = commit(targets[:, j], logits[:, j], done)
            g += 1
            if done.all() or g == limit:
                break
    if streamer is not None:
        streamer.end()
    return forwards.sequence  # (B, P + new)


__all__ = ["Forwards", "lossless_generate", "stopping", "verify"]
