"""Lossless sampling (hsd_exp.skip.choose, rounds): the tokens follow the full model's sampling distribution, every
position of a round included. Checked against the exact distribution, enumerated on a tiny-vocabulary model: all
sequences of the first NEW tokens under temperature, top-k and top-p, each with its probability

    P(y_1..y_n | x) = prod_j p~(y_j | x, y_<j),   p~ = the full model's softmax after the warpers,

against the empirical frequencies of N sampled rows. Under the right distribution the total variation
TV = 1/2 sum_y |f(y) - P(y)| has E[TV] <= 1/2 sum_y sqrt(P(y)(1 - P(y)) / N), and TV changes by at most 1/N per
row, so (McDiarmid) P(TV > E[TV] + eps) <= exp(-2 N eps^2): ``tv_bound`` is that bound at 1e-6."""

import math
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hsd_exp import build_policy, layer_skipping

NEW, N, DRAFT_LEN = 5, 3000, 3  # round 1 drafts tokens 2..4 (k = 3), the bonus is token 5
TEMPERATURE, TOP_K, TOP_P = 1.5, 2, 0.95
PROMPT = [3, 7, 1]
SAMPLING = {"do_sample": True, "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P, "pad_token_id": 0}


def tiny_vocab_model():
    """A seeded 6-layer llama over 16 token ids (no tokenizer: ids in, ids out), in float64."""
    config = LlamaConfig(vocab_size=16, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         initializer_range=0.1, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).double().eval()


def warped(logits: torch.Tensor) -> torch.Tensor:
    """(R, V) logits -> (R, V) probabilities, written out here (not generate()'s warpers): logits / temperature,
    keep the top-k, drop the least likely tokens whose total is <= 1 - top_p (the likeliest always stays)."""
    s = logits.double() / TEMPERATURE
    s = s.masked_fill(s < s.topk(TOP_K, dim=-1).values[:, -1:], float("-inf"))
    p = s.softmax(-1)
    ascending, order = p.sort(-1)
    drop = ascending.cumsum(-1) <= 1 - TOP_P
    drop[:, -1] = False
    p = p.scatter(1, order, ascending.masked_fill(drop, 0.0))
    return p / p.sum(-1, keepdim=True)


@torch.no_grad()
def exact_distribution(model) -> dict[tuple, float]:
    """Every NEW-token continuation of PROMPT with its probability under full-depth sampling (one forward over all
    prefixes of a length per step, no cache)."""
    seqs = {(): 1.0}
    for _ in range(NEW):
        prefixes = list(seqs)
        p = warped(model(input_ids=torch.tensor([PROMPT + list(y) for y in prefixes])).logits[:, -1])  # (R, V)
        seqs = {y + (t,): seqs[y] * float(p[r, t]) for r, y in enumerate(prefixes) for t in p[r].nonzero()[:, 0].tolist()}
    return seqs


def frequencies(model, seed, policy=None, **engine) -> tuple[dict[tuple, float], object]:
    torch.manual_seed(seed)
    ids = torch.tensor([PROMPT] * N)
    with torch.no_grad():
        if policy is None:
            out, stats = model.generate(input_ids=ids, max_new_tokens=NEW, **SAMPLING), None
        else:
            with layer_skipping(model, policy, max_new_tokens=NEW, **engine) as stats:
                out = model.generate(input_ids=ids, max_new_tokens=NEW, **SAMPLING)
    counts = Counter(map(tuple, out[:, len(PROMPT):].tolist()))
    return {y: c / N for y, c in counts.items()}, stats


def tv(a: dict, b: dict) -> float:
    return sum(abs(a.get(y, 0.0) - b.get(y, 0.0)) for y in set(a) | set(b)) / 2


def tv_bound(exact: dict) -> float:
    return sum(math.sqrt(p * (1 - p) / N) for p in exact.values()) / 2 + math.sqrt(math.log(1e6) / (2 * N))


@pytest.fixture(scope="module")
def model_and_exact():
    model = tiny_vocab_model()
    exact = exact_distribution(model)
    assert len(exact) == TOP_K ** NEW and sum(exact.values()) == pytest.approx(1.0)  # (the case: 32 sequences)
    return model, exact


def test_plain_sampling_follows_the_enumerated_distribution(model_and_exact):
    """The enumeration is generate()'s own distribution (else the lossless checks below would prove nothing)."""
    model, exact = model_and_exact
    plain, _ = frequencies(model, 0)
    assert tv(plain, exact) <= tv_bound(exact) < 0.1


@pytest.mark.parametrize("draft", ["hsd", "early_exit", "full"])
def test_lossless_sampling_follows_the_full_models_distribution_at_every_position(model_and_exact, draft):
    """NEW = 5 tokens with draft_len = 3: drafts at tokens 2..4, rejections resampled from norm(max(0, p - q)), the
    bonus token; HSD drafts at full depth for no bottom layer (verification runs every layer), the early exit at
    E = 4 keeps its bottom layers (verification runs 5..6), a full-depth draft accepts everything (every round ends
    with its bonus token)."""
    model, exact = model_and_exact
    policy = {"hsd": build_policy("hsd", s=1, min=0, max=5), "early_exit": build_policy("early_exit", layer=4),
              "full": build_policy("full")}[draft]
    got, stats = frequencies(model, 1, policy, lossless=True, draft_len=DRAFT_LEN)
    assert tv(got, exact) <= tv_bound(exact)
    s = stats.lossless
    if draft == "full":
        assert s.acceptance == 1.0 and s.verifications == 1  # one round: d_1..d_3 accepted, then the bonus token
    else:
        alone, _ = frequencies(model, 2, policy)
        assert tv(alone, exact) > 0.4  # the draft alone samples something else...
        assert s.drafted >= DRAFT_LEN and s.accepted < s.drafted  # ...and lossless mode rejected some of its drafts
