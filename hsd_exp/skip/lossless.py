"""Lossless mode: the skip policy drafts, the full model verifies (self-speculative decoding), batched.

One round, for a batch whose committed sequences x end in a token x_n not yet in the cache (greedy):

    draft    d_j = argmax p_skip(. | x, d_<j)          j = 1..k   (k forwards under the policy, one token each)
    verify   g_j = argmax p_full(. | x, d_<j)          j = 1..k+1 (one full-depth forward over x_n, d_1..d_k)
    accept   a = min over unfinished rows of  max { m : d_j = g_j for all j <= m }
    commit   d_1..d_a, g_{a+1}

Every committed token is the full model's greedy choice given the committed tokens before it (d_j = g_j for
j <= a; g_{a+1} is the full model's token), so the output is plain greedy ``generate()``'s, token for token.
Rows accept different numbers of drafts; the batch commits the smallest (``a``), which keeps every row one
length with no masks or per-row positions (for a row that accepted more, g_{a+1} = d_{a+1}: still its full
model's token). The cost: a batch's acceptance is its least-accepting row's.

The cache: drafting writes the policy's K/V (skipped layers write none, or K/V from skipped states); before
verifying, every layer is cut back to the committed positions, whose K/V are the full model's, and the verify
forward writes the full model's K/V for x_n, d_1..d_k; after it the rejected positions are cut off again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from hsd_exp.errors import ConfigError
from hsd_exp.skip.cache import SkipCache

# GenerationConfig fields that would change greedy tokens, with the values that leave them off: lossless mode does
# not apply them, so it refuses anything else.
UNSUPPORTED = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
               "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
               "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
               "renormalize_logits": (None, False)}


@dataclass
class LosslessStats:
    """Per run: drafted / accepted tokens, verify forwards, committed tokens; acceptance = accepted / drafted."""

    drafted: int = 0  # draft tokens proposed per row, summed over rounds (a round drafts k for the batch)
    accepted: int = 0  # of them committed (the batch's a per round)
    verifications: int = 0  # full-depth verify forwards
    committed: int = 0  # tokens committed per row, summed over rounds (a + 1 each)
    draft_layers: list[float] = field(default_factory=list)  # layers per draft token, as the engine recorded

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_verification(self) -> float:
        return self.committed / self.verifications if self.verifications else float("nan")

    def summary(self, draft_len: int) -> dict:
        """What metrics.json records of a lossless run."""
        layers = self.draft_layers
        return {"lossless": True, "draft_len": draft_len, "acceptance": self.acceptance,
                "tokens_per_verification": self.tokens_per_verification, "drafted": self.drafted,
                "accepted": self.accepted, "verifications": self.verifications,
                "draft_avg_layers": sum(layers) / len(layers) if layers else None}


def check_lossless(gen: GenerationConfig, draft_len: int) -> None:
    """Greedy, one beam, no score-changing processors: what lossless mode reproduces exactly."""
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
        raise ConfigError(f"draft_len={draft_len} is out of range: a positive number of tokens to draft per round")
    if (gen.num_beams or 1) != 1:
        raise ConfigError(f"lossless decoding needs num_beams=1 (got {gen.num_beams}): it reproduces greedy "
                          "decoding; use decode=greedy with it")
    if gen.do_sample:
        raise ConfigError("lossless decoding reproduces greedy decoding: set do_sample=false")
    changed = [f for f, off in UNSUPPORTED.items() if getattr(gen, f, None) not in off]
    if changed:
        raise ConfigError(f"lossless decoding does not apply {', '.join(changed)}: unset them (greedy, "
                          "max_new_tokens, min_new_tokens, eos/pad are supported)")


def _greedy(logits: torch.Tensor, index: torch.Tensor | int, gen: GenerationConfig, eos: list[int]) -> torch.Tensor:
    """argmax of (B, V) logits for generated token ``index``, EOS masked while index < min_new_tokens."""
    if gen.min_new_tokens and eos and int(index) < gen.min_new_tokens:
        logits = logits.clone()
        logits[:, eos] = float("-inf")
    return logits.argmax(-1)  # (B,)


def lossless_generate(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      gen: GenerationConfig, draft_len: int, stats: LosslessStats) -> torch.Tensor:
    """Greedy ``generate()`` of ``engine.model``, drafts under ``engine.policy``: (B, P + new) token ids."""
    model, cache_kw = engine.model, engine.cache_kw
    B, P = input_ids.shape
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    eos = [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id or [])
    eos_ids = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
    limit = gen.max_new_tokens
    cache = SkipCache(config=model.config)

    def forward(ids: torch.Tensor, full: bool) -> torch.Tensor:
        """Logits (B, q, V) for ``ids`` (B, q), the positions right after the cached ones."""
        q, c = ids.shape[1], cache.get_seq_length()
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, c + q - P)], dim=1)  # (B, c + q)
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]  # generate()'s position ids
        with engine.full_depth(full):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
        return out.logits  # (B, q, V)

    seq = input_ids
    first = _greedy(forward(input_ids, full=True)[:, -1], 0, gen, eos)  # the prefill: every layer
    new = [first]
    done = torch.isin(first, eos_ids)  # (B,) rows past their EOS
    while len(new) < limit and not done.all():
        g = len(new)  # generated tokens so far; new[-1] is not in the cache yet
        n = P + g - 1  # committed positions with K/V in the cache
        k = min(draft_len, limit - g - 1)
        drafts, tok = [], new[-1]
        for j in range(k):  # draft: one token per forward, under the policy
            steps_before = len(engine.stats.per_step)
            tok = _greedy(forward(tok.unsqueeze(1), full=False)[:, -1], g + j, gen, eos)
            stats.draft_layers += engine.stats.per_step[steps_before:]
            drafts.append(tok)
        cache.truncate(n)  # back to the full model's K/V (the drafts' are the policy's)
        verify_in = torch.stack([new[-1], *drafts], dim=1)  # (B, k + 1)
        logits = forward(verify_in, full=True)  # (B, k + 1, V)
        stats.verifications += 1
        targets = torch.stack([_greedy(logits[:, j], g + j, gen, eos) for j in range(k + 1)], dim=1)  # (B, k+1)
        if k:
            match = (torch.stack(drafts, dim=1) == targets[:, :k]) | done.unsqueeze(1)  # finished rows agree
            a = int(match.long().cumprod(dim=1).sum(dim=1).min())  # the batch's accepted length
        else:
            a = 0
        stats.drafted += k
        stats.accepted += a
        stats.committed += a + 1
        cache.truncate(n + a + 1)  # keep x_n, d_1..d_a (the full model's K/V); g_{a+1} is fed next round
        for j in range(a + 1):
            tok = torch.where(done, torch.full_like(targets[:, j], pad), targets[:, j])
            new.append(tok)
            done = done | torch.isin(tok, eos_ids)
            if done.all() or len(new) == limit:
                break
    return torch.cat([seq, torch.stack(new, dim=1)], dim=1)  # (B, P + new)


def effective_config(model, kwargs: dict) -> tuple[GenerationConfig, dict]:
    """generate()'s own rule: its ``generation_config`` (or the model's) updated by the call's keyword arguments;
    returns the config and the rest (model inputs)."""
    gen = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    rest = gen.update(**kwargs)
    if gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos if isinstance(eos, int) else eos[0]
    return gen, rest


__all__ = ["LosslessStats", "check_lossless", "effective_config", "lossless_generate"]
