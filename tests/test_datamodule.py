"""HSDDataModule: training pairs and their batch layout (what skip-aware training relies on), eval batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load
from omegaconf import OmegaConf

from hsd_exp.data import load_examples, sample_dir
from hsd_exp.datamodule import HSDDataModule
from hsd_exp.prompts import build_prompt

ROOT = Path(__file__).resolve().parents[1]


def e2e(**overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "e2e.yaml")
    cfg.path = "sample"
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def tok():
    return load("tiny-llama").tokenizer  # GPT-2 tokenizer, left padding, pad = eos


def test_one_training_pair_per_reference(tok):
    dm = HSDDataModule(e2e(), tok, chat=False, train_limit=3)
    dm.setup("fit")
    examples = load_examples(e2e(), split="train", limit=3)
    assert len(examples) == 3
    assert len(dm.train_pairs) == sum(len(ex.references) for ex in examples) > 3
    assert dm.val_pairs == []  # the sample has no validation split: train without one
    # the prompt is exactly what evaluation feeds the model; the target ends with EOS
    first = dm.train_pairs[0]
    assert tok.decode(first.prompt_ids) == build_prompt(examples[0].source, e2e(), tok, chat=False)
    assert first.target_ids[-1] == tok.eos_token_id
    assert tok.decode(first.target_ids[:-1]).strip() == examples[0].references[0].strip()


def test_train_batch_layout_aligns_prompt_ends(tok):
    dm = HSDDataModule(e2e(), tok, chat=False, train_limit=4)
    dm.setup("fit")
    pairs = dm.train_pairs[:: max(1, len(dm.train_pairs) // 4)][:4]
    batch = dm.collate_train(pairs)
    P = int(batch["prompt_len"])
    ids, mask, labels, pos = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]
    assert ids.shape == mask.shape == labels.shape == pos.shape
    assert P == max(len(p.prompt_ids) for p in pairs)
    for row, pair in enumerate(pairs):
        lp, n_p, n_t = P - len(pair.prompt_ids), len(pair.prompt_ids), len(pair.target_ids)
        assert (mask[row, :lp] == 0).all() and (mask[row, lp:P + n_t] == 1).all() and (mask[row, P + n_t:] == 0).all()
        assert ids[row, lp:P].tolist() == pair.prompt_ids  # prompt ends at column P - 1 in every row
        assert ids[row, P:P + n_t].tolist() == pair.target_ids  # target starts at column P in every row
        assert (labels[row, :P] == -100).all() and (labels[row, P + n_t:] == -100).all()  # loss on targets only
        assert labels[row, P:P + n_t].tolist() == pair.target_ids  # EOS (= pad id) included
        # left padding must not shift positions: the first real token is position 0
        assert pos[row, lp:P + n_t].tolist() == list(range(n_p + n_t))


def test_max_length_truncates_prompt_start_and_target_end(tok):
    full = HSDDataModule(e2e(), tok, chat=False, train_limit=2, max_length=1024)
    short = HSDDataModule(e2e(), tok, chat=False, train_limit=2, max_length=24)
    full.setup("fit")
    short.setup("fit")
    for a, b in zip(full.train_pairs, short.train_pairs, strict=True):
        assert len(b.prompt_ids) + len(b.target_ids) <= 24
        assert b.target_ids and b.target_ids == a.target_ids[: len(b.target_ids)]
        assert b.prompt_ids == a.prompt_ids[len(a.prompt_ids) - len(b.prompt_ids):]  # keeps the separator


def test_eval_batches_left_padded_with_metadata(tok):
    dm = HSDDataModule(e2e(limit=5), tok, chat=False, eval_batch_size=2)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [len(b["ids"]) for b in batches] == [2, 2, 1]
    examples = load_examples(e2e(limit=5))
    assert [i for b in batches for i in b["ids"]] == [ex.id for ex in examples]
    for b in batches:
        assert (b["attention_mask"][:, -1] == 1).all()  # generation continues right after every prompt
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert all(refs for refs in b["references"])
    first = batches[0]
    n = int(first["attention_mask"][0].sum())
    assert tok.decode(first["input_ids"][0, -n:]) == build_prompt(examples[0].source, e2e(), tok, chat=False)


def test_skip_ids_are_not_generated_again(tok):
    ids = [ex.id for ex in load_examples(e2e(limit=5))]
    dm = HSDDataModule(e2e(limit=5), tok, chat=False, skip_ids={ids[1], ids[3]})
    dm.setup("test")
    assert [ex.id for ex in dm.test_examples] == [ids[0], ids[2], ids[4]]


def test_validation_split_used_when_present(tok, tmp_path):
    src = sample_dir("e2e")
    shutil.copy(src / "train.jsonl", tmp_path / "train.jsonl")
    rows = [json.loads(line) for line in (src / "test.jsonl").read_text().splitlines() if line.strip()]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    dm = HSDDataModule(e2e(path=str(tmp_path)), tok, chat=False, train_limit=2, val_limit=2)
    dm.setup("fit")
    val = load_examples(e2e(path=str(tmp_path)), split="validation", limit=2)
    assert len(dm.val_pairs) == sum(len(ex.references) for ex in val) > 0
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "prompt_len"}
    assert isinstance(batch["prompt_len"], torch.Tensor)
