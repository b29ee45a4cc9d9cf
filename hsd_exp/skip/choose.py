"""How a lossless round picks tokens from logits and which drafts the full model accepts (hsd_exp.skip.lossless).

    greedy    draft d_j = argmax q_j;  accepted when d_j = argmax p_j;  correction argmax p_j
    sampling  d_j ~ q_j;  accepted with probability min(1, p_j(d_j) / q_j(d_j));  correction ~ norm(max(0, p_j - q_j))
              (when every draft passed, the bonus token ~ p_{k+1})

q_j and p_j are the draft's and the full model's distributions after generate()'s own warpers (temperature,
top-k, top-p) and its min_new_tokens rule, so what is accepted is what plain generate() would have produced.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class Chooser:
    """How a round picks tokens from logits: greedy argmax, or sampling with generate()'s own warpers. EOS is
    masked while the token index < min_new_tokens, as generate()'s MinNewTokensLengthLogitsProcessor does."""

    def __init__(self, gen: GenerationConfig, eos: list[int], processors: LogitsProcessorList | None = None):
        self.gen, self.eos, self.sample = gen, eos, bool(gen.do_sample)
        self.processors = processors  # generate(logits_processor=...): after min_new_tokens, before the warpers
        self.warpers = LogitsProcessorList()
        if self.sample:  # generate()'s order: temperature, top-k, top-p
            if gen.temperature is not None and gen.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(gen.temperature))
            if gen.top_k:
                self.warpers.append(TopKLogitsWarper(gen.top_k))
            if gen.top_p is not None and gen.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(gen.top_p))

    def scores(self, logits: torch.Tensor, index: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) logits of generated token ``index`` -> the processed scores generate() would choose from;
        ``ids`` (B, P + index): the tokens before it, which the call's own logits processors read."""
        if self.gen.min_new_tokens and self.eos and index < self.gen.min_new_tokens:
            logits = logits.clone()
            logits[:, self.eos] = float("-inf")
        if self.processors:
            logits = self.processors(ids, logits.float())
        return self.warpers(None, logits.float()) if self.sample else logits

    def pick(self, logits: torch.Tensor, index: int,
             ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft token (B,) and, when sampling, its distribution q (B, V)."""
        scores = self.scores(logits, index, ids)
        if not self.sample:
            return scores.argmax(-1), None
        q = scores.softmax(-1)
        return torch.multinomial(q, 1).squeeze(1), q

    def accept(self, drafts: torch.Tensor, qs: list, logits: torch.Tensor, first: int,
               ids: torch.Tensor | None = None):
        """drafts (B, k), their q's, the full model's logits (B, k+1, V) for generated tokens first..first+k;
        ``ids`` (B, P + first): the committed tokens before them.
        Returns (m, targets): each row's accepted prefix (B,) and the token to commit at each place (B, k+1):
        the accepted draft before m, the correction at m."""
        k = drafts.shape[1]
        seq = None if ids is None else torch.cat([ids, drafts], dim=1)  # (B, P + first + k)
        before = [None if seq is None else seq[:, :seq.shape[1] - k + j] for j in range(k + 1)]  # ids, d_1..d_j
        scores = [self.scores(logits[:, j], first + j, before[j]) for j in range(k + 1)]
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


__all__ = ["Chooser"]
