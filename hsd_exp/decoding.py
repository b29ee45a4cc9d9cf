"""How a run decodes: the ``decode`` config node parsed once into ``DecodeSettings``.

Every task that generates (generate, evaluate, compare, finetune_evaluate) and the benchmark decode through this
one object, so each honours ``decode=lossless`` (or refuses what it cannot reproduce) in the same way:

    decode node  ->  generation   a transformers GenerationConfig (every key but the three below; pad/eos are
                                  the tokenizer's, filled in by ``generation_config(tokenizer)``)
                     batch_size   examples per generate() call (the evaluation data module's batch size)
                     lossless     LosslessSettings(draft_len, draft_confidence) with ``lossless: true``, else None:
                                  the policy drafts, the full model verifies (hsd_exp.skip.lossless)

Parsing is the check: a value generate() would reject (or crash on) after the model has loaded raises a
ConfigError here naming the override that fixes it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig

from hsd_exp.errors import ConfigError
from hsd_exp.skip.lossless import UNSUPPORTED, LosslessSettings, unsupported

LOSSLESS_KEYS = ("draft_len", "draft_confidence")  # decode=lossless's keys: LosslessSettings' fields
NOT_GENERATION = ("batch_size", "lossless", *LOSSLESS_KEYS)  # decode keys generate() does not take
FROM_DATASET = "${dataset.max_new_tokens}"  # decode.max_new_tokens' default: the dataset's output length


@dataclass(frozen=True)
class DecodeSettings:
    """The decoding every task and the benchmark run: generate()'s settings, the batch size and lossless mode."""

    generation: GenerationConfig  # without pad/eos: generation_config(tokenizer) adds the tokenizer's
    batch_size: int = 1
    lossless: LosslessSettings | None = None  # None: plain skipping (the policy's tokens are the output)
    max_new_tokens_key: str = "decode.max_new_tokens"  # the override that sets max_new_tokens, for messages

    @property
    def max_new_tokens(self) -> int:
        """Tmax: the tokens each input generates at most (the policies' schedules run over T = 0..Tmax-1)."""
        return int(self.generation.max_new_tokens)

    def generation_config(self, tokenizer) -> GenerationConfig:
        """generate()'s GenerationConfig for this tokenizer (a copy: callers may change their own)."""
        gen = copy.deepcopy(self.generation)
        gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        return gen

    def record(self, stats) -> dict:
        """What a run records of its decoding beyond generate()'s settings: for a lossless run the drafts' cost
        (``lossless``, ``draft_len``, acceptance, tokens per verification, ...: SkipStats.lossless); else {}."""
        if self.lossless is None or stats is None or stats.lossless is None:
            return {}
        return stats.lossless.summary(self.lossless.draft_len, self.lossless.draft_confidence)

    @classmethod
    def from_config(cls, decode: DictConfig) -> DecodeSettings:
        """Parse (and so check) the ``decode`` node; ConfigError naming the value and its fix."""
        d = decode
        key = max_new_tokens_key(d)
        lossless = None
        if d.get("lossless"):
            lossless = LosslessSettings(**{k: d[k] for k in LOSSLESS_KEYS if k in d})  # validates both
            if d.get("num_beams") != 1:
                raise ConfigError(f"decode=lossless needs num_beams=1 (got {d.get('num_beams')}): beam search keeps "
                                  "no single draft to verify; drop the decode.num_beams override")
        _positive_int("decode.batch_size", d.get("batch_size"), "decode.batch_size=8 (examples per generate() call)")
        _positive_int("decode.num_beams", d.get("num_beams"),
                      "decode.num_beams=1 (greedy or sampling) or 4 (decode=beam4)")
        _positive_int(key, d.get("max_new_tokens"), f"{key}=48 (the tokens to generate per input)")
        if d.get("do_sample"):
            _check_sampling(d.get("temperature", 1.0), d.get("top_p", 1.0))
        penalty = d.get("repetition_penalty", 1.0)
        if penalty is not None and (not _is_number(penalty) or penalty <= 0):
            raise ConfigError(f"decode.repetition_penalty={penalty!r} must be > 0; set decode.repetition_penalty=1.0 "
                              "(no penalty)")
        node = {k: v for k, v in OmegaConf.to_container(d, resolve=True).items() if k not in NOT_GENERATION}
        generation = _generation(node)
        if generation.stop_strings is not None:  # generate() needs the tokenizer for them, which no task passes
            raise ConfigError(f"decode.stop_strings={generation.stop_strings!r} is not supported by the tasks "
                              "(generation stops at EOS or max_new_tokens); drop the decode.stop_strings override")
        if lossless is not None:
            _check_lossless(generation)
        return cls(generation, int(d.batch_size), lossless, key)


def max_new_tokens_key(decode: DictConfig) -> str:
    """The override that sets decode.max_new_tokens: dataset.max_new_tokens while decode keeps its interpolation."""
    raw = OmegaConf.to_container(decode, resolve=False).get("max_new_tokens")
    return "dataset.max_new_tokens" if raw == FROM_DATASET else "decode.max_new_tokens"


def _generation(node: dict) -> GenerationConfig:
    """The node built as its ``_target_`` (a GenerationConfig); transformers' own checks of the combination (e.g.
    +decode.num_beam_groups that does not divide num_beams) as a ConfigError."""
    try:
        return instantiate(node)
    except Exception as err:  # noqa: BLE001 - GenerationConfig refuses the combination: bad input
        cause = err.__cause__ or err
        raise ConfigError(f"decode: {str(cause).splitlines()[0][:300]} (fix the decode.* override)") from None


def _check_lossless(generation: GenerationConfig) -> None:
    """What lossless mode does not apply (hsd_exp.skip.lossless.UNSUPPORTED) refused now, not after the model loads
    (generate() inside the engine would refuse it then)."""
    changed = unsupported(generation)
    if changed:
        values = ", ".join(f"decode.{f}={getattr(generation, f)!r}" for f in changed)
        fixes = " ".join(f"decode.{f}={_off(UNSUPPORTED[f])}" for f in changed)
        raise ConfigError(f"decode=lossless does not apply {values}: the full model verifies plain greedy (or "
                          f"sampled) tokens; set {fixes}, or decode=greedy to keep it without lossless mode")


def _off(values: tuple) -> str:
    """The override value that leaves a field off: its neutral value, or null."""
    value = values[-1]
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _positive_int(key: str, value, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer; set {fix}")


def _check_sampling(temperature, top_p) -> None:
    if not _is_number(temperature) or temperature <= 0:
        raise ConfigError(f"decode.temperature={temperature!r} must be > 0 when sampling (decode.do_sample=true); "
                          "set decode.temperature=0.7, or decode=greedy for deterministic decoding")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ConfigError(f"decode.top_p={top_p!r} must be in (0, 1] when sampling; set decode.top_p=0.9 "
                          "(1.0 = no nucleus cut)")
