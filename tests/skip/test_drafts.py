"""The draft seam (hsd_exp.skip.drafts): a draft strategy is a small class the rounds ask for tokens; whatever it
proposes, the output stays plain greedy's. Two toy strategies that run no layer at all: random tokens (nearly all
rejected) and an oracle that knows the answer (all accepted). PolicyDraft itself is tested in test_lossless.py."""

import copy

import pytest
import torch

from hsd_exp.skip.drafts import Drafts
from hsd_exp.skip.engine import SkipEngine
from hsd_exp.skip.lossless import LosslessSettings
from hsd_exp.skip.policies import build_policy

from helpers import PROMPTS, load

T = 12


class RandomDraft:
    """k uniformly random tokens; no forward, so nothing below verification is exact (E = 0)."""

    exact_bottom = 0

    def __init__(self, engine, forwards, choose, settings, stats, steps):
        self.vocab = engine.model.config.vocab_size
        self.generator = torch.Generator().manual_seed(0)

    def draft(self, last, k, index, done):
        return Drafts([torch.randint(self.vocab, last.shape, generator=self.generator) for _ in range(k)], [None] * k)


class OracleDraft(RandomDraft):
    """Proposes plain greedy's own next tokens (set as ``ANSWER``, generated tokens from index 0)."""

    ANSWER: torch.Tensor

    def draft(self, last, k, index, done):
        return Drafts([self.ANSWER[:, index + j] for j in range(k)], [None] * k)


def run(model, tokenizer, batch, draft_class):
    enc = tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": T, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    engine = SkipEngine(model, build_policy("hsd", s=1, min=0, max=4), max_new_tokens=T,
                        lossless=LosslessSettings(draft_len=3))
    engine.draft_class = draft_class
    engine.install()
    try:
        return model.generate(**enc, **kw), engine.stats
    finally:
        engine.remove()


@pytest.mark.parametrize("batch", [1, 3])
def test_any_draft_strategy_leaves_the_output_plain_greedy(batch):
    lm = load("tiny-llama")
    model = copy.deepcopy(lm.model).double()
    enc = lm.tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    plain = model.generate(**enc, max_new_tokens=T, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    OracleDraft.ANSWER = plain[:, enc.input_ids.shape[1]:]

    out, stats = run(model, lm.tokenizer, batch, RandomDraft)
    assert torch.equal(out, plain)
    s = stats.lossless
    assert s.drafted > 0 and s.accepted < s.drafted and s.committed == T - 1
    assert stats.per_step == []  # the prefill and verify forwards run fixed layers and record no decode step

    out, stats = run(model, lm.tokenizer, batch, OracleDraft)
    assert torch.equal(out, plain)
    s = stats.lossless
    assert s.acceptance == 1.0 and s.verifications == 3  # 11 tokens after the prefill's: 4 + 4 + 3 (k=3, 3, 2)
    assert s.verified_layers == 3 * 6 and s.exact_bottom == 0
