"""Lossless mode and generate()'s own arguments: what it applies gives plain generate()'s output with the same
arguments (logits processors, stopping criteria, a streamer, min_length, stop_strings), and what it cannot apply is
refused by name (it used to be dropped: lossless output then differed from plain generate() with the same call)."""

import copy

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from hsd_exp import build_policy, layer_skipping
from hsd_exp.errors import ConfigError

from helpers import PROMPTS, load

T = 12
HSD = {"s": 1, "min": 0, "max": 4}


@pytest.fixture(scope="module")
def lm():
    """tiny-llama in float64 (the draft and verify forwards agree with plain generate() to the last bit)."""
    tiny = load("tiny-llama")
    return copy.deepcopy(tiny.model).double(), tiny.tokenizer


def greedy(model, tok, lossless: bool, **kw):
    """Batch 3 (left-padded), greedy: plain generate(), or inside lossless layer skipping with an HSD draft."""
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": T, "do_sample": False, "pad_token_id": tok.pad_token_id, **kw}
    if not lossless:
        return model.generate(**enc, **kw)
    with layer_skipping(model, build_policy("hsd", **HSD), max_new_tokens=T, lossless=True, draft_len=3):
        return model.generate(**enc, **kw)


class Ban(LogitsProcessor):
    """Bans fixed token ids."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.ids] = float("-inf")
        return scores


class NoRepeat(LogitsProcessor):
    """Bans each row's previous token: it reads input_ids, so it needs the right tokens before every position."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))


class StopAt(StoppingCriteria):
    """A row is done once it has produced ``token``."""

    def __init__(self, token, prompt_len):
        self.token, self.prompt_len = token, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_len:] == self.token).any(dim=1)


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


def new_tokens(out, tokenizer):
    return out[:, tokenizer(PROMPTS[:3], return_tensors="pt", padding=True).input_ids.shape[1]:]


def test_logits_processors_apply_in_every_round(lm):
    model, tok = lm
    plain = new_tokens(greedy(model, tok, lossless=False), tok)
    banned = sorted(set(plain[:, :4].flatten().tolist()))  # tokens greedy writes early: banning them changes it
    for processors in ([Ban(banned)], [NoRepeat()], [Ban(banned), NoRepeat()]):
        expected = greedy(model, tok, lossless=False, logits_processor=LogitsProcessorList(processors))
        assert not torch.equal(new_tokens(expected, tok), plain)  # the processor matters here
        out = greedy(model, tok, lossless=True, logits_processor=LogitsProcessorList(processors))
        assert torch.equal(out, expected)


def test_stopping_criteria_streamer_and_min_length_apply(lm):
    model, tok = lm
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    P = enc.input_ids.shape[1]
    plain = greedy(model, tok, lossless=False)
    stop_token = int(plain[0, P + 4])  # row 0's fifth token: row 0 stops there, the others go on (or stop too)
    expected = greedy(model, tok, lossless=False, stopping_criteria=StoppingCriteriaList([StopAt(stop_token, P)]))
    assert not torch.equal(expected, plain)
    out = greedy(model, tok, lossless=True, stopping_criteria=StoppingCriteriaList([StopAt(stop_token, P)]))
    assert torch.equal(out, expected)

    streams = []
    for lossless in (False, True):
        streamer = Recorder()
        greedy(model, tok, lossless=lossless, streamer=streamer)
        assert streamer.ended
        streams.append(streamer.puts)
    assert len(streams[1]) == len(streams[0]) == T + 1  # the prompt, then one (B,) put per token
    assert all(torch.equal(a, b) for a, b in zip(*streams, strict=True))

    eos = int(plain[0, P + 2])  # a token greedy writes early, made EOS: min_length holds it back
    short = greedy(model, tok, lossless=False, eos_token_id=eos)
    held = greedy(model, tok, lossless=False, eos_token_id=eos, min_length=P + 6)
    assert not torch.equal(short, held)
    assert torch.equal(greedy(model, tok, lossless=True, eos_token_id=eos, min_length=P + 6), held)


def test_stop_strings_apply_with_the_tokenizer(lm):
    model, tok = lm
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    plain = greedy(model, tok, lossless=False)
    text = tok.decode(plain[0, enc.input_ids.shape[1] + 3:enc.input_ids.shape[1] + 5])
    expected = greedy(model, tok, lossless=False, stop_strings=[text], tokenizer=tok)
    assert not torch.equal(expected, plain)
    assert torch.equal(greedy(model, tok, lossless=True, stop_strings=[text], tokenizer=tok), expected)


@pytest.mark.parametrize(("kw", "message"), [
    ({"repetition_penalty": 1.3}, "does not apply repetition_penalty"),
    ({"num_return_sequences": 2, "do_sample": True}, "does not apply num_return_sequences"),  # greedy: HF refuses
    ({"return_dict_in_generate": True}, "does not apply return_dict_in_generate"),
    ({"prefix_allowed_tokens_fn": lambda b, ids: [0]}, r"does not take generate\(prefix_allowed_tokens_fn=...\)"),
    ({"stop_strings": ["x"]}, "stop_strings=.* needs the tokenizer"),
])
def test_what_lossless_cannot_apply_is_refused(lm, kw, message):
    model, tok = lm
    with pytest.raises(ConfigError, match=message) as err:
        greedy(model, tok, lossless=True, **kw)
    assert "\n" not in str(err.value)
