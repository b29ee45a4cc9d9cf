"""Prompt formats: one place that turns a source text into the model's input string.

Two formats, chosen by the model (``model.chat``):
- fine-tuned / base models:  ``prompt = source + separator``            e.g. "<article>\\n\\nSummary:"
  and for training            ``target = " " + reference + eos``        (no space if separator ends in one)
- chat / instruct models:    ``prompt = chat_template([user: instruction + "\\n\\n" + source])`` with the
  assistant turn opened (add_generation_prompt=True); for training the target is what the template
  appends for the assistant turn (the reply and its end-of-turn token), plus eos if that lacks it.

Sources longer than ``dataset.max_source_tokens`` tokens (by the model's tokenizer, no special tokens)
are cut to their first ``max_source_tokens`` tokens before formatting, so that
prompt + ``max_new_tokens`` fits the context window. The cut is made in the original string (at a
token's end offset), so no text is re-decoded. Fine-tuning may pass a smaller source budget
(``max_source_tokens=``) so that prompt + target fits ``finetune.max_length``: the prompt is then
built exactly as evaluation would build it for that shorter source (template and separator intact).

Prompt + ``max_new_tokens`` must also fit the model's positions (``max_position_embeddings``): evaluation
passes ``build_prompt_within`` the tokens left for the prompt, and a source is cut further where
``max_source_tokens`` would not fit (``hsd_exp.data.context.check_context`` warns once with the budget that does).

Prompt strings are tokenised with the tokenizer's special tokens for base models (a tokenizer that adds
BOS adds it in training and evaluation alike) and without them for chat models, whose template already
writes them: see `prompt_special_tokens`.
"""

from __future__ import annotations

from typing import Any

from hsd_exp.errors import ConfigError


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _text(cfg: Any, key: str, default: str) -> str:
    """``instruction`` / ``separator``: a literal ``\\n`` (what a shell override holds) means a newline."""
    value = _get(cfg, key, default)
    return default if value is None else str(value).replace("\\n", "\n")


def _token_count(text: str, tokenizer: Any) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def truncate_source(source: str, tokenizer: Any, max_tokens: int | None) -> str:
    """The longest prefix of ``source`` cut at a token boundary that re-tokenises to <= max_tokens."""
    if not max_tokens or max_tokens <= 0 or not source:
        return source
    try:
        enc = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):  # slow tokenizers have no offsets
        offsets = None
    if offsets is None:
        ids = tokenizer(source, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) <= max_tokens:
            return source
        return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    if len(offsets) <= max_tokens:
        return source
    # BPE merges can differ at the cut, so step back until the prefix re-tokenises within budget
    n = max_tokens
    while n > 0:
        cut = source[: offsets[n - 1][1]].rstrip()
        if _token_count(cut, tokenizer) <= max_tokens:
            return cut
        n -= 1
    return ""


def prompt_special_tokens(chat: bool) -> bool:
    """``add_special_tokens`` for a prompt string: the one rule training and evaluation share.

    Chat templates write BOS and turn markers into the string themselves; base-model prompts are plain
    text, so the tokenizer's own special tokens (BOS, if it adds one) are what the model expects.
    """
    return not chat


def _source_budget(dataset_cfg: Any, max_source_tokens: int | None) -> int | None:
    """The override when given (fine-tuning's budget), else the dataset's ``max_source_tokens``."""
    return _get(dataset_cfg, "max_source_tokens") if max_source_tokens is None else max_source_tokens


def _user_content(source: str, dataset_cfg: Any, tokenizer: Any, max_source_tokens: int | None = None) -> str:
    source = truncate_source(source, tokenizer, _source_budget(dataset_cfg, max_source_tokens))
    instruction = _text(dataset_cfg, "instruction", "")
    return f"{instruction}\n\n{source}" if instruction else source


def _check_chat(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"chat prompts need a tokenizer chat template, but {type(tokenizer).__name__} "
            f"{getattr(tokenizer, 'name_or_path', '')!r} has none; set model.chat=false"
        )


def build_prompt(example_source: str, dataset_cfg: Any, tokenizer: Any, chat: bool,
                 max_source_tokens: int | None = None) -> str:
    """The model input for one example (see the module docstring for both formats).

    ``max_source_tokens`` overrides the dataset's source budget (fine-tuning fits prompt + target in
    ``finetune.max_length`` this way); None keeps the dataset's.
    """
    if not chat:
        source = truncate_source(example_source, tokenizer, _source_budget(dataset_cfg, max_source_tokens))
        return source + _text(dataset_cfg, "separator", "\n")
    _check_chat(tokenizer)
    user = {"role": "user", "content": _user_content(example_source, dataset_cfg, tokenizer, max_source_tokens)}
    return tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)


def prompt_format(dataset: Any, chat: bool) -> dict:
    """The format task=generate gives its free prompt, as a dataset config ``build_prompt`` takes (and run results
    record): evaluation's format of ``dataset``, but a chat model gets the prompt alone as its user turn (the
    dataset's instruction asks for its task, not for a free prompt's); other models get ``prompt + separator``,
    the format they were fine-tuned on. A free prompt is never cut (``max_source_tokens`` None): one that does not
    fit the context is refused (hsd_exp.data.context.check_prompt_fits), not silently shortened."""
    return {"chat": chat, "instruction": None if chat else _get(dataset, "instruction"),
            "separator": None if chat else _get(dataset, "separator"), "max_source_tokens": None}


def template_tokens(dataset_cfg: Any, tokenizer: Any, chat: bool) -> int:
    """Tokens a prompt holds besides its source: instruction, separator, chat template, BOS."""
    prompt = build_prompt("", dataset_cfg, tokenizer, chat)
    return len(tokenizer(prompt, add_special_tokens=prompt_special_tokens(chat), verbose=False)["input_ids"])


def build_prompt_within(source: str, dataset_cfg: Any, tokenizer: Any, chat: bool, max_tokens: int) -> str:
    """`build_prompt` whose tokens (as evaluation tokenises the prompt) are at most ``max_tokens``.

    The source budget starts at ``dataset.max_source_tokens`` (or the room left by the template, if smaller) and
    shrinks by the excess while BPE merges at the source/template seam still overflow; the template stays whole.
    """
    room = max(1, max_tokens - template_tokens(dataset_cfg, tokenizer, chat))
    configured = _get(dataset_cfg, "max_source_tokens")
    budget = min(configured, room) if configured else room
    while True:
        prompt = build_prompt(source, dataset_cfg, tokenizer, chat, max_source_tokens=budget)
        excess = len(tokenizer(prompt, add_special_tokens=prompt_special_tokens(chat), verbose=False)["input_ids"]) \
            - max_tokens
        if excess <= 0:
            return prompt
        if budget <= 1:
            raise ConfigError(f"a prompt of this dataset does not fit {max_tokens} tokens even with a 1-token source; "
                              "lower decode.max_new_tokens")
        budget = max(1, budget - excess)


def training_text(source: str, target: str, dataset_cfg: Any, tokenizer: Any, chat: bool,
                  max_source_tokens: int | None = None) -> tuple[str, str]:
    """(prompt, target_with_eos) for fine-tuning; the caller puts the loss on the target tokens only.

    prompt + target is the full training sequence; prompt is exactly what `build_prompt` gives at
    decode time (for the same ``max_source_tokens``), so training and evaluation see the same format.
    """
    eos = tokenizer.eos_token or ""
    target = target.strip()
    if not chat:
        prompt = build_prompt(source, dataset_cfg, tokenizer, chat=False, max_source_tokens=max_source_tokens)
        space = "" if prompt[-1:].isspace() else " "
        return prompt, f"{space}{target}{eos}"
    _check_chat(tokenizer)
    user = {"role": "user", "content": _user_content(source, dataset_cfg, tokenizer, max_source_tokens)}
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": target}], tokenize=False)
    # the assistant turn as the template renders it; templates that rewrite history fall back to target
    reply = full[len(prompt) :] if full.startswith(prompt) else target
    if eos and eos not in reply:
        reply += eos
    return prompt, reply
