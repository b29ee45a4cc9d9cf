"""Lossless mode: the skip policy drafts, the full model verifies (self-speculative decoding), batched.

One round, for a batch whose committed sequences x end in a token x_n not yet in the cache:

    draft    d_j ~ q_j = q(. | x, d_<j)           j = 1..k   (k forwards under the policy, one token each;
                                                             with a confidence c, drafting stops after d_j
                                                             once max q_j < c for some unfinished row)
    verify   p_j = p(. | x, d_<j)                 j = 1..k+1 (one full-depth forward over x_n, d_1..d_k)
    accept   greedy:   d_j is accepted when d_j = argmax p_j
             sampling: d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j))   (speculative sampling)
             m_r = the accepted prefix of row r,  a = min over unfinished rows of m_r
    commit   d_1..d_a, then c_{a+1}: the row's accepted d_{a+1} where m_r > a, else its correction,
             argmax p_{a+1} (greedy) or a sample of norm(max(0, p_{a+1} - q_{a+1})) (sampling; p_{k+1} when a = k)

Greedy: every committed token is the full model's argmax given the tokens before it, so the output is plain
greedy ``generate()``'s, token for token. Sampling: each committed token is distributed as p given the tokens
before it (the speculative-sampling identity; whether position j is committed depends only on positions < j),
so the output follows the full model's sampling distribution. Rows accept different numbers of drafts; the
batch commits the smallest (``a``), which keeps every row one length with no masks or per-row positions. The
cost: a batch's acceptance is its least-accepting row's.

The cache: drafting writes the policy's K/V (skipped layers write none, or K/V from skipped states); before
verifying, every layer is cut back to the committed positions, whose K/V are the full model's, and the verify
forward writes the full model's K/V for x_n, d_1..d_k; after it the rejected positions are cut off again.

Exact bottom layers (LayerSkip's verification): when every draft token runs layers 1..E (an early exit at E, or
``keep_first`` >= E), the drafts computed those layers exactly as the full model would, so their K/V stay and the
verify forward runs only layers E+1..L, on the states h_E(x_n), h_E(d_1)..h_E(d_k) the drafts left entering layer
E+1 (d_k's own bottom pass is one extra bottom-only forward, no LM head): L - E layers per verification, not L.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hsd_exp.errors import ConfigError
from hsd_exp.families import submodule
from hsd_exp.skip.cache import SkipCache

# GenerationConfig fields that would change greedy tokens, with the values that leave them off: lossless mode does
# not apply them, so it refuses anything else.
UNSUPPORTED = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
               "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
               "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
               "renormalize_logits": (None, False), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
               "eta_cutoff": (None, 0.0), "min_p": (None, 0.0)}


@dataclass
class LosslessStats:
    """Per run: drafted / accepted tokens, verify forwards, committed tokens; acceptance = accepted / drafted."""

    drafted: int = 0  # draft tokens proposed per row, summed over rounds (a round drafts k for the batch)
    accepted: int = 0  # of them committed (the batch's a per round)
    verifications: int = 0  # verify forwards (every layer, or the layers above the exact bottom ones)
    committed: int = 0  # tokens committed per row, summed over rounds (a + 1 each)
    draft_layers: list[float] = field(default_factory=list)  # layers per draft token, as the engine recorded
    verified_layers: int = 0  # layers run by the verify forwards, summed (L each, or L - E above exact bottom layers)
    exact_bottom: int = 0  # E: the bottom layers every draft ran exactly, which verification skips (0: none)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_verification(self) -> float:
        return self.committed / self.verifications if self.verifications else float("nan")

    @property
    def verify_avg_layers(self) -> float | None:
        return self.verified_layers / self.verifications if self.verifications else None

    def summary(self, draft_len: int, draft_confidence: float | None = None) -> dict:
        """What metrics.json records of a lossless run."""
        layers = self.draft_layers
        return {"lossless": True, "draft_len": draft_len, "draft_confidence": draft_confidence, "acceptance": self.acceptance,
                "tokens_per_verification": self.tokens_per_verification, "drafted": self.drafted,
                "accepted": self.accepted, "verifications": self.verifications,
                "draft_avg_layers": sum(layers) / len(layers) if layers else None,
                "verify_avg_layers": self.verify_avg_layers}


def check_lossless(gen: GenerationConfig, draft_len: int, draft_confidence: float | None = None) -> None:
    """One beam, no score-changing processors beyond temperature / top-k / top-p: what lossless mode reproduces."""
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
        raise ConfigError(f"draft_len={draft_len} is out of range: a positive number of tokens to draft per round")
    check_confidence(draft_confidence)
    if (gen.num_beams or 1) != 1:
        raise ConfigError(f"lossless decoding needs num_beams=1 (got {gen.num_beams}): beams keep no single draft "
                          "to verify; use decode=greedy (or sampling) with it")
    if not gen.max_new_tokens:  # generate()'s max_length rules (defaults, embeddings) are not reproduced
        raise ConfigError("lossless decoding needs max_new_tokens (pass generate(max_new_tokens=...) or set it in "
                          "the generation config); max_length alone is not supported")
    changed = [f for f, off in UNSUPPORTED.items() if getattr(gen, f, None) not in off]
    if changed:
        raise ConfigError(f"lossless decoding does not apply {', '.join(changed)}: unset them (max_new_tokens, "
                          "min_new_tokens, eos/pad, and for sampling temperature, top_k and top_p are supported)")


def check_confidence(draft_confidence: float | None, key: str = "draft_confidence") -> None:
    """None (always draft draft_len tokens) or a probability in (0, 1]."""
    if draft_confidence is None:
        return
    if isinstance(draft_confidence, bool) or not isinstance(draft_confidence, (int, float)) or not (
            0 < draft_confidence <= 1):
        raise ConfigError(f"{key}={draft_confidence} is out of range: null (always draft draft_len tokens) or a "
                          "probability in (0, 1] (stop drafting once the draft's top probability falls below it)")


class Chooser:
    """How a round picks tokens from logits: greedy argmax, or sampling with generate()'s own warpers. EOS is
    masked while the token index < min_new_tokens, as generate()'s MinNewTokensLengthLogitsProcessor does."""

    def __init__(self, gen: GenerationConfig, eos: list[int]):
        self.gen, self.eos, self.sample = gen, eos, bool(gen.do_sample)
        self.warpers = LogitsProcessorList()
        if self.sample:  # generate()'s order: temperature, top-k, top-p
            if gen.temperature is not None and gen.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(gen.temperature))
            if gen.top_k:
                self.warpers.append(TopKLogitsWarper(gen.top_k))
            if gen.top_p is not None and gen.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(gen.top_p))

    def scores(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        """(B, V) logits of generated token ``index`` -> the processed scores generate() would choose from."""
        if self.gen.min_new_tokens and self.eos and index < self.gen.min_new_tokens:
            logits = logits.clone()
            logits[:, self.eos] = float("-inf")
        return self.warpers(None, logits.float()) if self.sample else logits

    def draft(self, logits: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft token (B,) and, when sampling, its distribution q (B, V)."""
        scores = self.scores(logits, index)
        if not self.sample:
            return scores.argmax(-1), None
        q = scores.softmax(-1)
        return torch.multinomial(q, 1).squeeze(1), q

    def verify(self, drafts: torch.Tensor, qs: list, logits: torch.Tensor, first: int):
        """drafts (B, k), their q's, the full model's logits (B, k+1, V) for generated tokens first..first+k.
        Returns (m, targets): each row's accepted prefix (B,) and the token to commit at each place (B, k+1):
        the accepted draft before m, the correction at m."""
        k = drafts.shape[1]
        scores = [self.scores(logits[:, j], first + j) for j in range(k + 1)]
        if not self.sample:
            targets = torch.stack([s.argmax(-1) for s in scores], dim=1)  # (B, k+1)
            accepted = drafts == targets[:, :k]
        else:
            ps = [s.softmax(-1) for s in scores]
            targets, accepted = [], []
            for j in range(k):
                d = drafts[:, j:j + 1]
                ratio = ps[j].gather(1, d) / qs[j].gather(1, d)  # p_j(d_j) / q_j(d_j), (B, 1)
                ok = (torch.rand_like(ratio) <= ratio).squeeze(1)
                residual = (ps[j] - qs[j]).clamp_min(0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, ps[j])
                fix = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1).squeeze(1)
                targets.append(torch.where(ok, drafts[:, j], fix))
                accepted.append(ok)
            targets.append(torch.multinomial(ps[k], 1).squeeze(1))  # the bonus token, when every draft passed
            targets, accepted = torch.stack(targets, dim=1), torch.stack(accepted, dim=1) if k else drafts.bool()
        m = accepted.long().cumprod(dim=1).sum(dim=1) if k else torch.zeros_like(targets[:, 0])
        return m, targets


def exact_bottom(policy, max_steps: int, num_layers: int, steps: int | None = None) -> int:
    """E: the bottom layers 1..E that every draft token runs (at every T < ``steps``, default Tmax), so the drafts'
    K/V there are the full model's; at most L - 1 (verification runs at least the top layer). 0 for a policy that
    decides while decoding (CALM, a router) or skips a bottom layer somewhere (HSD, SkipDecode without keep_first)."""
    if not policy.static:
        return 0
    bottom = num_layers - 1
    for t in range(max_steps if steps is None else steps):
        run = set(policy.layers(t, max_steps, num_layers))
        bottom = next(i for i in range(bottom + 1) if i not in run or i == bottom)
        if bottom == 0:
            break
    return bottom


def lossless_generate(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      gen: GenerationConfig, draft_len: int, stats: LosslessStats,
                      draft_confidence: float | None = None) -> torch.Tensor:
    """``generate()`` of ``engine.model`` (greedy or sampling), drafts under ``engine.policy``: (B, P + new).
    ``draft_confidence``: stop a round's drafting early once some unfinished row's draft distribution has its top
    probability below it (that row will likely reject, and the batch commits its least-accepting row's count)."""
    model, cache_kw, stack = engine.model, engine.cache_kw, submodule(engine.model, engine.family.stack)
    B, P = input_ids.shape
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    eos = [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id or [])
    eos_ids = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
    limit = gen.max_new_tokens
    choose = Chooser(gen, eos)
    cache = SkipCache(config=model.config)
    cache.activate_past_recording()  # sliding-window layers (Gemma-3) keep what truncate() may need to go back to

    L = engine.L
    # 0: verify at full depth. Drafts are generated tokens 1..limit-1 of the engine's Tmax (the policy's clock).
    E = stats.exact_bottom = exact_bottom(engine.policy, engine._call_tmax or limit, L, steps=limit)
    engine._edge = E or None  # the drafts record the state entering layer E + 1 (0-based E)

    def forward(ids: torch.Tensor, layers: range | None, feed: torch.Tensor | None = None, head: bool = True):
        """Logits (B, q, V) for ``ids`` (B, q), the positions right after the cached ones, running ``layers`` (None:
        the policy's); ``feed`` (B, q, C): layer E's input instead of the bottom layers' output; ``head`` False runs
        the decoder stack alone (no logits)."""
        q, c = ids.shape[1], cache.get_seq_length()
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, c + q - P)], dim=1)  # (B, c + q)
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]  # generate()'s position ids
        with engine.run_layers(layers, feed):
            out = (model if head else stack)(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                             **{cache_kw: cache})
        return out.logits if head else None  # (B, q, V)

    def verify(ids: torch.Tensor, n: int) -> torch.Tensor:
        """The full model's logits (B, k + 1, V) for ``ids`` = x_n, d_1..d_k; the cache holds n committed positions
        (plus, below layer E, the drafts' x_n, d_1..d_{k-1}, whose states at E the engine captured)."""
        stats.verifications += 1
        if not E:  # full depth: every layer from the committed positions on
            cache.truncate(n)  # back to the full model's K/V (the drafts' are the policy's)
            stats.verified_layers += L
            return forward(ids, range(L))
        cache.truncate(n, first=E)  # above E, back to the full model's K/V; below, the drafts' are the full model's
        forward(ids[:, -1:], range(E), head=False)  # d_k (x_n if k = 0) through the bottom layers: K/V and h_E
        feed, engine._captured = torch.cat(engine._captured, dim=1), None  # (B, k + 1, C): h_E of x_n, d_1..d_k
        cache.count_from = E  # the verified positions come right after the n committed ones of layers E..
        try:
            stats.verified_layers += L - E
            return forward(ids, range(E, L), feed=feed)
        finally:
            cache.count_from = 0

    first, _ = choose.draft(forward(input_ids, range(L))[:, -1], 0)  # the prefill, every layer: token 0
    new = [first]
    done = torch.isin(first, eos_ids)  # (B,) rows past their EOS
    while len(new) < limit and not done.all():
        g = len(new)  # generated tokens so far; new[-1] is not in the cache yet
        n = P + g - 1  # committed positions with K/V in the cache
        k = min(draft_len, limit - g - 1)
        drafts, qs, tok = [], [], new[-1]
        engine._captured = [] if E else None  # (B, 1, C) h_E of x_n, d_1, ... as the drafts run
        for j in range(k):  # draft: one token per forward, under the policy
            steps_before = len(engine.stats.per_step)
            logits = forward(tok.unsqueeze(1), None)[:, -1]  # (B, V)
            tok, q = choose.draft(logits, g + j)
            stats.draft_layers += engine.stats.per_step[steps_before:]
            drafts.append(tok)
            qs.append(q)
            if draft_confidence is not None and j + 1 < k:
                top = (q if q is not None else choose.scores(logits, g + j).float().softmax(-1)).amax(-1)  # (B,)
                if bool((top < draft_confidence)[~done].any()):
                    break
        k = len(drafts)
        logits = verify(torch.stack([new[-1], *drafts], dim=1), n)  # (B, k + 1, V)
        m, targets = choose.verify(torch.stack(drafts, dim=1) if k else first.new_empty(B, 0), qs, logits, g)
        a = int(torch.where(done, torch.full_like(m, k), m).min())  # finished rows do not hold the batch back
        stats.drafted += k
        stats.accepted += a
        stats.committed += a + 1
        cache.truncate(n + a + 1)  # keep x_n, d_1..d_a (the full model's K/V); c_{a+1} is fed next round
        for j in range(a + 1):
            tok = torch.where(done, torch.full_like(targets[:, j], pad), targets[:, j])
            new.append(tok)
            done = done | torch.isin(tok, eos_ids)
            if done.all() or len(new) == limit:
                break
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)  # (B, P + new)


def effective_config(model, kwargs: dict) -> tuple[GenerationConfig, dict]:
    """generate()'s own rule: its ``generation_config`` (or the model's) updated by the call's keyword arguments;
    returns the config and the rest (model inputs)."""
    gen = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    rest = gen.update(**kwargs)
    if gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos if isinstance(eos, int) else eos[0]
    return gen, rest


__all__ = ["Chooser", "LosslessStats", "check_confidence", "check_lossless", "effective_config", "exact_bottom",
           "lossless_generate"]
