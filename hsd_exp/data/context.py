"""The model's context: a prompt plus decode.max_new_tokens must fit the model's positions.

GPT-2 indexes past its 1,024 positions with an IndexError mid-run, so evaluation cuts dataset sources to fit (with
one warning naming the budget) and task=generate refuses a prompt too long (the user's own words are not cut).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from hsd_exp.data.prompts import template_tokens
from hsd_exp.decoding import DecodeSettings
from hsd_exp.errors import ConfigError
from hsd_exp.models.loading import LoadedModel

log = logging.getLogger(__name__)


def prompt_room(decode: DecodeSettings, lm: LoadedModel) -> int | None:
    """Tokens a prompt may take: the model's positions less decode.max_new_tokens (None: the model states none)."""
    positions = lm.max_positions
    return None if positions is None else positions - decode.max_new_tokens


def check_context(dataset: DictConfig, decode: DecodeSettings, lm: LoadedModel) -> None:
    """Dataset prompts + decode.max_new_tokens must fit the model's positions (GPT-2 indexes past its 1,024 with an
    IndexError mid-run). Sources are cut to fit, as dataset.max_source_tokens already cuts them, with a warning
    naming the budget; only a max_new_tokens that leaves no room for a prompt is refused."""
    room = prompt_room(decode, lm)
    if room is None:
        return
    positions, key, max_new = lm.max_positions, decode.max_new_tokens_key, decode.max_new_tokens
    template = template_tokens(dataset, lm.tokenizer, lm.chat)
    if room - template < 1:
        raise ConfigError(f"{key}={max_new} leaves no room for a prompt in model {lm.name}'s {positions} positions "
                          f"(its prompt template alone takes {template} tokens); set {key} to at most "
                          f"{positions - template - 1}")
    configured = dataset.get("max_source_tokens")
    if configured is None or configured > room - template:
        log.warning("dataset.max_source_tokens=%s: a source that long + the prompt template (%d tokens) + %s=%d "
                    "would not fit model %s's %d positions, so sources are cut to %d tokens; set "
                    "dataset.max_source_tokens=%d (or less) to silence this", configured, template, key, max_new,
                    lm.name, positions, room - template, room - template)


def check_prompt_fits(decode: DecodeSettings, lm: LoadedModel, prompt_tokens: int) -> None:
    """task=generate: the prompt is the user's own words, so a prompt too long is refused, not silently cut."""
    positions, max_new = lm.max_positions, decode.max_new_tokens
    if positions is None or prompt_tokens + max_new <= positions:
        return
    key = decode.max_new_tokens_key
    fix = (f"shorten the prompt to at most {positions - max_new} tokens (or lower {key})" if positions > max_new
           else f"set {key} below {positions}")
    raise ConfigError(f"prompt is {prompt_tokens} tokens and {key}={max_new}: together more than model {lm.name}'s "
                      f"{positions} positions; {fix}")
