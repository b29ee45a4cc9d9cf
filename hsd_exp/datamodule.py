"""LightningDataModule over the paper's datasets: training pairs for fine-tuning, prompts for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from hsd_exp.data import Example, load_examples
from hsd_exp.prompts import build_prompt, training_text


@dataclass
class TrainPair:
    prompt_ids: list[int]
    target_ids: list[int]


class HSDDataModule(pl.LightningDataModule):
    """``train``/``val`` yield (prompt, reference) pairs; ``test``/``predict`` yield prompts to generate from.

    Training batches put every prompt's end in the same column (prompts left-padded, targets right-padded):
    generated-token index T = column - prompt length is then the same for every row, which is what
    skip-aware training needs to apply the decode-time layer schedule per position.
    """

    def __init__(self, dataset_cfg: Any, tokenizer, chat: bool, eval_batch_size: int = 8,
                 train_batch_size: int = 8, max_length: int = 256, train_limit: int | None = None,
                 val_limit: int | None = None, skip_ids: set[str] | None = None, num_workers: int = 0):
        super().__init__()
        self.cfg = dataset_cfg
        self.tok = tokenizer
        self.chat = chat
        self.eval_batch_size = eval_batch_size
        self.train_batch_size = train_batch_size
        self.max_length = max_length
        self.train_limit, self.val_limit = train_limit, val_limit
        self.skip_ids = skip_ids or set()  # resume: ids already in predictions.jsonl
        self.num_workers = num_workers
        self.train_pairs: list[TrainPair] = []
        self.val_pairs: list[TrainPair] = []
        self.test_examples: list[Example] = []

    # ------------------------------------------------------------------ data
    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and not self.train_pairs:
            self.train_pairs = self._pairs(load_examples(self.cfg, split="train", limit=self.train_limit))
            self.val_pairs = self._pairs(load_examples(self.cfg, split="validation", limit=self.val_limit)
                                         if self._has_validation() else [])
        if stage in ("test", "predict", None) and not self.test_examples:
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
        pairs = []
        for ex in examples:
            for ref in ex.references:
                prompt, target = training_text(ex.source, ref, self.cfg, self.tok, self.chat)
                p = self.tok(prompt, add_special_tokens=False)["input_ids"]
                t = self.tok(target, add_special_tokens=False)["input_ids"]
                t = t[: max(1, self.max_length - len(p))]
                pairs.append(TrainPair(p[-(self.max_length - len(t)):], t))
        return pairs

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self):
        return DataLoader(self.train_pairs, batch_size=self.train_batch_size, shuffle=True,
                          collate_fn=self.collate_train, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_pairs, batch_size=self.train_batch_size, collate_fn=self.collate_train,
                          num_workers=self.num_workers)

    def test_dataloader(self):
        return DataLoader(self.test_examples, batch_size=self.eval_batch_size, collate_fn=self.collate_eval,
                          num_workers=self.num_workers)

    predict_dataloader = test_dataloader

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

    def collate_eval(self, examples: list[Example]) -> dict[str, Any]:
        prompts = [build_prompt(ex.source, self.cfg, self.tok, self.chat) for ex in examples]
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not self.chat)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "ids": [ex.id for ex in examples], "sources": [ex.source for ex in examples],
                "references": [ex.references for ex in examples]}
