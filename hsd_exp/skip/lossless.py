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

Where each part lives: this module holds what lossless mode is and what it accepts (its settings, its stats, the
generate() settings it reproduces, E); hsd_exp.skip.rounds runs the rounds; hsd_exp.skip.drafts proposes the
drafts (``PolicyDraft``: the skip policy; a new draft strategy is a class there); hsd_exp.skip.choose picks and
accepts tokens. No torch here: preflight and the decoding settings import it before anything heavy loads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hsd_exp.errors import ConfigError

if TYPE_CHECKING:
    from transformers import GenerationConfig

# GenerationConfig fields that would change the tokens or the output's form, with the values that leave them off:
# lossless mode does not apply them, so it refuses anything else. (Applied: max_new_tokens, min_new_tokens,
# min_length, max_time, stop_strings, eos/pad; sampling's temperature, top_k, top_p.)
UNSUPPORTED = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
               "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
               "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
               "renormalize_logits": (None, False), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
               "eta_cutoff": (None, 0.0), "min_p": (None, 0.0), "top_h": (None,), "guidance_scale": (None, 1.0),
               "watermarking_config": (None,), "num_return_sequences": (None, 1),
               "return_dict_in_generate": (None, False), "token_healing": (None, False)}

# generate() arguments the rounds apply (beside the model inputs input_ids and attention_mask): the call's own logits
# processors (after generate()'s, before the sampling warpers, at every scored position: drafts and verification),
# stopping criteria (after each committed token), a streamer (the prompt, then each committed token), and the
# tokenizer that stop_strings need. Anything else is refused by name.
CALL_ARGUMENTS = ("logits_processor", "stopping_criteria", "streamer", "tokenizer")
MODEL_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class LosslessSettings:
    """decode=lossless: the policy drafts ``draft_len`` tokens per round, the full model verifies them;
    ``draft_confidence`` (None = off) ends a round's drafting once some row's top draft probability is below it.

    The one check of both values (preflight, the bench and ``layer_skipping`` all build this object)."""

    draft_len: int = 4
    draft_confidence: float | None = None

    def __post_init__(self):
        k = self.draft_len
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"decode.draft_len={k!r} must be a positive integer (draft_len={k!r} is out of range: "
                              "a round drafts at least one token); set decode.draft_len=4")
        c = self.draft_confidence
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1):
            raise ConfigError(f"decode.draft_confidence={c!r} is out of range: null (always draft draft_len tokens) "
                              "or a probability in (0, 1] (stop drafting once the draft's top probability falls "
                              "below it); set decode.draft_confidence=null")


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


def check_generation(gen: GenerationConfig) -> None:
    """One beam, no score-changing processors beyond temperature / top-k / top-p: what lossless mode reproduces."""
    if (gen.num_beams or 1) != 1:
        raise ConfigError(f"lossless decoding needs num_beams=1 (got {gen.num_beams}): beams keep no single draft "
                          "to verify; use decode=greedy (or sampling) with it")
    if not gen.max_new_tokens:  # generate()'s max_length rules (defaults, embeddings) are not reproduced
        raise ConfigError("lossless decoding needs max_new_tokens (pass generate(max_new_tokens=...) or set it in "
                          "the generation config); max_length alone is not supported")
    changed = unsupported(gen)
    if changed:
        raise ConfigError(f"lossless decoding does not apply {', '.join(changed)}: unset them (max_new_tokens, "
                          "min_new_tokens, min_length, max_time, stop_strings, eos/pad, and for sampling "
                          "temperature, top_k and top_p are supported)")


def unsupported(gen: GenerationConfig) -> list[str]:
    """The ``UNSUPPORTED`` fields ``gen`` sets (the ones lossless mode would not apply)."""
    return [f for f, off in UNSUPPORTED.items() if getattr(gen, f, None) not in off]


def check_arguments(rest: dict) -> dict:
    """generate()'s keyword arguments beyond its GenerationConfig (``rest``, from ``effective_config``): the model
    inputs and ``CALL_ARGUMENTS`` pass; anything else (inputs_embeds, prefix_allowed_tokens_fn, an assistant
    model, ...) would be dropped, so it is refused. Returns ``rest`` without the None-valued ones."""
    rest = {k: v for k, v in rest.items() if v is not None}
    unknown = sorted(set(rest) - set(CALL_ARGUMENTS) - set(MODEL_INPUTS))
    if unknown:
        raise ConfigError(f"lossless decoding does not take generate({', '.join(f'{k}=...' for k in unknown)}): "
                          f"drop it (it takes {', '.join(MODEL_INPUTS + CALL_ARGUMENTS)} and a GenerationConfig)")
    return rest


def effective_config(model, kwargs: dict) -> tuple[GenerationConfig, dict]:
    """generate()'s own rule: its ``generation_config`` (or the model's) updated by the call's keyword arguments;
    returns the config and the rest (model inputs)."""
    gen = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    rest = gen.update(**kwargs)
    if gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos if isinstance(eos, int) else eos[0]
    return gen, rest


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


__all__ = ["CALL_ARGUMENTS", "LosslessSettings", "LosslessStats", "MODEL_INPUTS", "UNSUPPORTED", "check_arguments",
           "check_generation", "effective_config", "exact_bottom", "unsupported"]
