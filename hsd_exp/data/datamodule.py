"""LightningDataModule over the paper's datasets: training pairs for fine-tuning, prompts for evaluation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from hsd_exp.data.loaders import Example, load_examples
from hsd_exp.data.prompts import (
    build_prompt,
    build_prompt_within,
    prompt_special_tokens,
    training_text,
    truncate_source,
)
from hsd_exp.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TrainPair:
    prompt_ids: list[int]
    target_ids: list[int]


@dataclass
class _FittedPair(TrainPair):
    target_cut: bool  # the target's end was dropped to fit max_length


class HSDDataModule(pl.LightningDataModule):
    """``train``/``val`` yield (prompt, reference) pairs; ``test`` yields prompts to generate from.

    Training batches put every prompt's end in the same column (prompts left-padded, targets right-padded):
    generated-token index T = column - prompt length is then the same for every row, which is what
    skip-aware training needs to apply the decode-time layer schedule per position.

    ``max_length`` caps prompt + target tokens per training pair; None derives it per pair from the
    dataset: ``max_source_tokens + max_new_tokens`` + the prompt template's tokens (what evaluation can
    need at most). Pairs that do not fit get a shorter source, never a cut prompt (see `_pair`).

    The model's context: ``max_positions`` caps every training pair (prompt + target), ``max_prompt_tokens`` (the
    positions less max_new_tokens) every evaluation prompt; sources are cut further to fit either.
    """

    def __init__(self, dataset_cfg: Any, tokenizer, chat: bool, eval_batch_size: int = 8,
                 train_batch_size: int = 8, max_length: int | None = None, train_limit: int | None = None,
                 val_limit: int | None = None, skip_ids: set[str] | None = None,
                 max_positions: int | None = None, max_prompt_tokens: int | None = None):
        super().__init__()
        self.cfg = dataset_cfg
        self.tok = tokenizer
        self.chat = chat
        self.eval_batch_size = eval_batch_size
        self.train_batch_size = train_batch_size
        self.max_length = max_length
        self.train_limit, self.val_limit = train_limit, val_limit
        self.skip_ids = skip_ids or set()  # resume: ids already in predictions.jsonl
        self.max_positions = max_positions
        self.max_prompt_tokens = max_prompt_tokens
        self.train_pairs: list[TrainPair] = []
        self.val_pairs: list[TrainPair] = []
        self.test_examples: list[Example] = []

    # ------------------------------------------------------------------ data
    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and not self.train_pairs:
            self.train_pairs = self._pairs(load_examples(self.cfg, split="train", limit=self.train_limit))
            self.val_pairs = self._pairs(load_examples(self.cfg, split="validation", limit=self.val_limit)
                                         if self._has_validation() else [])
        if stage in ("test", None) and not self.test_examples:
            examples = load_examples(self.cfg)  # dataset.split / dataset.limit
            self.test_examples = [ex for ex in examples if ex.id not in self.skip_ids]

    def _has_validation(self) -> bool:
        try:
            load_examples(self.cfg, split="validation", limit=1)
            return True
        except Exception:  # noqa: BLE001 - a dataset without a validation split trains without one
            return False

    def _pairs(self, examples: list[Example]) -> list[TrainPair]:
        """One training pair per (source, reference): multi-reference datasets train on every reference."""
        pairs = [self._pair(ex.source, ref) for ex in examples for ref in ex.references]
        cut = sum(p.target_cut for p in pairs)
        if cut:  # once per split, not once per pair
            log.warning("%d of %d training targets did not fit finetune.max_length=%s with their prompt and "
                        "were cut at the end; raise finetune.max_length (null = derived from the dataset)",
                        cut, len(pairs), "null (derived)" if self.max_length is None else self.max_length)
        return [TrainPair(p.prompt_ids, p.target_ids) for p in pairs]

    def _encode_prompt(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=prompt_special_tokens(self.chat))["input_ids"]

    def _pair(self, source: str, ref: str) -> _FittedPair:
        """Prompt and target ids whose total fits the length cap, by shortening the source, not the prompt.

        The prompt is always what `build_prompt` gives for some source budget, so its start (article
        start, chat template header) and its end (separator / assistant turn) are the ones evaluation
        feeds the model. The source budget is the cap minus the target minus the template's own tokens;
        a target is cut at its end only when it would leave the source less than half the room after
        the template (or less than the whole source, if that is shorter).
        """
        prompt, target = training_text(source, ref, self.cfg, self.tok, self.chat)
        p = self._encode_prompt(prompt)
        t = self.tok(target, add_special_tokens=False)["input_ids"]
        max_src = self.cfg.get("max_source_tokens")
        # tokens of the source as it sits in the prompt; the rest of the prompt is template
        n_src = len(self.tok(truncate_source(source, self.tok, max_src), add_special_tokens=False)["input_ids"])
        overhead = len(p) - n_src
        limit = self.max_length
        if limit is None:
            max_new = self.cfg.get("max_new_tokens")
            if max_src and max_new:
                limit = overhead + max_src + max_new
        if self.max_positions:  # the model has no positions beyond these, whatever the dataset would allow
            limit = min(limit or self.max_positions, self.max_positions)
        if limit is None:
            return _FittedPair(p, t, False)  # nothing to derive a cap from: keep what evaluation builds
        if len(p) + len(t) <= limit:
            return _FittedPair(p, t, False)
        room = limit - overhead  # tokens for source + target
        if room < 2:
            raise self._no_room(limit, overhead)
        cap = room - min(n_src, room // 2)
        cut = len(t) > cap
        t = t[:cap]
        budget = room - len(t)  # >= 1: the source budget that should make prompt + target fit
        while True:
            prompt, _ = training_text(source, ref, self.cfg, self.tok, self.chat, max_source_tokens=budget)
            p = self._encode_prompt(prompt)
            excess = len(p) + len(t) - limit
            # BPE merges across the source/separator seam can shift the count by a token or two
            if excess <= 0 or budget <= 1:
                break
            budget = max(1, budget - excess)
        if excess > 0:  # the seam still overflows at a 1-token source: give the target's end instead
            if len(t) - excess < 1:
                raise self._no_room(limit, overhead)
            t, cut = t[: len(t) - excess], True
        return _FittedPair(p, t, cut)

    @staticmethod
    def _no_room(limit: int, overhead: int) -> ConfigError:
        return ConfigError(f"finetune.max_length={limit} leaves no room for source and target: the prompt "
                           f"template alone takes {overhead} tokens; set finetune.max_length larger "
                           "(or null = derived from the dataset)")

    # ------------------------------------------------------------------ loaders (in-process: tokenising is cheap)
    def train_dataloader(self):
        return DataLoader(self.train_pairs, batch_size=self.train_batch_size, shuffle=True,
                          collate_fn=self.collate_train)

    def val_dataloader(self):
        return DataLoader(self.val_pairs, batch_size=self.train_batch_size, collate_fn=self.collate_train)

    def test_dataloader(self):
        return DataLoader(self.test_examples, batch_size=self.eval_batch_size, collate_fn=self.collate_eval)

    def collate_train(self, pairs: list[TrainPair]) -> dict[str, torch.Tensor]:
        pad = self.tok.pad_token_id
        P = max(len(x.prompt_ids) for x in pairs)
        S = max(len(x.target_ids) for x in pairs)
        ids, mask, labels = [], [], []
        for x in pairs:
            lp, lt = P - len(x.prompt_ids), S - len(x.target_ids)
            ids.append([pad] * lp + x.prompt_ids + x.target_ids + [pad] * lt)
            mask.append([0] * lp + [1] * (len(x.prompt_ids) + len(x.target_ids)) + [0] * lt)
            labels.append([-100] * (lp + len(x.prompt_ids)) + x.target_ids + [-100] * lt)  # loss on targets only
        mask_t = torch.tensor(mask)
        return {
            "input_ids": torch.tensor(ids),  # (B, P + S)
            "attention_mask": mask_t,
            "position_ids": (mask_t.cumsum(-1) - 1).clamp(min=0),  # left padding must not shift positions
            "labels": torch.tensor(labels),
            "prompt_len": torch.tensor(P),
        }

    def eval_prompt(self, source: str) -> str:
        if self.max_prompt_tokens is None:
            return build_prompt(source, self.cfg, self.tok, self.chat)
        return build_prompt_within(source, self.cfg, self.tok, self.chat, self.max_prompt_tokens)

    def collate_eval(self, examples: list[Example]) -> dict[str, Any]:
        prompts = [self.eval_prompt(ex.source) for ex in examples]
        # same special-token rule as training: a tokenizer that adds BOS adds it to both
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=prompt_special_tokens(self.chat))
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "ids": [ex.id for ex in examples], "sources": [ex.source for ex in examples],
                "references": [ex.references for ex in examples]}
