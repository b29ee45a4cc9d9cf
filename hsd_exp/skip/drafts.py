"""Lossless mode's draft strategies: what proposes the tokens a round verifies (the rounds: hsd_exp.skip.rounds).

A strategy is a small class, built once per generate() call as ``Strategy(engine, forwards, choose, settings,
stats, steps)`` (the engine, the call's cached ``Forwards``, its ``Chooser``, the LosslessSettings, the
LosslessStats, the call's max_new_tokens), with one attribute and one method:

    exact_bottom                  E: the bottom layers 1..E its drafts ran exactly as the full model runs them, so
                                  verification keeps their K/V and runs only layers E+1..L, on the states the drafts
                                  left entering layer E+1 (``Drafts.states``); 0: verification runs every layer
    draft(last, k, index, done)   up to k tokens after ``last`` (x_n, not yet in the cache), with their q's

A strategy that scores its drafts through ``choose`` hands it the tokens before each one (``forwards.sequence``,
the committed tokens, then its own drafts): the call's logits processors read them.

``PolicyDraft`` drafts with the skip policy itself (self-speculative decoding); ``SkipEngine.draft_class`` says
which strategy a call uses. A new strategy (an early exit with a cheaper head, a reduced-vocabulary draft head)
is a class beside it: the rounds, the verification and the engine stay as they are. (transformers'
``CandidateGenerator.get_candidates`` and LayerSkip's one generator per strategy are the same seam.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from hsd_exp.skip.lossless import LosslessSettings, LosslessStats, exact_bottom

if TYPE_CHECKING:
    from hsd_exp.skip.choose import Chooser
    from hsd_exp.skip.engine import SkipEngine
    from hsd_exp.skip.rounds import Forwards


@dataclass
class Drafts:
    """One round's drafts d_1..d_k for a batch of B rows."""

    tokens: list[torch.Tensor] = field(default_factory=list)  # k tokens, each (B,)
    qs: list[torch.Tensor | None] = field(default_factory=list)  # q_j (B, V) when sampling, else None
    states: list[torch.Tensor] = field(default_factory=list)  # E > 0: (B, 1, C) entering layer E+1, x_n .. d_{k-1}


class DraftStrategy(Protocol):
    exact_bottom: int

    def draft(self, last: torch.Tensor, k: int, index: int, done: torch.Tensor) -> Drafts:
        """Up to ``k`` drafts after ``last`` (B,), which is generated token ``index - 1``; ``done`` (B,): rows past
        their EOS (their drafts are padding and should not cut a round short)."""
        ...


class PolicyDraft:
    """Drafts under the engine's skip policy: each draft token is one cached forward whose layers the policy
    chooses, as plain skipping would decode it. With ``confidence`` c, drafting stops after d_j once some
    unfinished row's top probability max q_j is below c (that row will likely reject, and the batch commits its
    least-accepting row's count)."""

    def __init__(self, engine: SkipEngine, forwards: Forwards, choose: Chooser, settings: LosslessSettings,
                 stats: LosslessStats, steps: int):
        self.engine, self.forwards, self.choose, self.stats = engine, forwards, choose, stats
        self.confidence = settings.draft_confidence
        # drafts are generated tokens 1..steps-1 of the call's Tmax (the policy's clock)
        self.exact_bottom = exact_bottom(engine.policy, engine.call.tmax or steps, engine.L, steps=steps)

    def draft(self, last: torch.Tensor, k: int, index: int, done: torch.Tensor) -> Drafts:
        out, tok, recorded = Drafts(), last, self.engine.stats.per_step
        ids = self.forwards.sequence  # (B, P + index): the committed tokens, then the drafts so far
        with self.engine.run_layers(capture_at=self.exact_bottom or None) as states:  # the policy decides
            for j in range(k):
                before = len(recorded)
                logits = self.forwards(tok.unsqueeze(1))[:, -1]  # (B, V)
                tok, q = self.choose.pick(logits, index + j, ids)
                ids = torch.cat([ids, tok[:, None]], dim=1)  # the call's logits processors read them
                self.stats.draft_layers += recorded[before:]  # the layers the engine recorded for this token
                out.tokens.append(tok)
                out.qs.append(q)
                if j + 1 < k and self._unsure(logits, q, index + j, done):
                    break
        out.states = states
        return out

    def _unsure(self, logits: torch.Tensor, q: torch.Tensor | None, index: int, done: torch.Tensor) -> bool:
        if self.confidence is None:
            return False
        top = (q if q is not None else self.choose.scores(logits, index).float().softmax(-1)).amax(-1)  # (B,)
        return bool((top < self.confidence)[~done].any())


__all__ = ["DraftStrategy", "Drafts", "PolicyDraft"]
