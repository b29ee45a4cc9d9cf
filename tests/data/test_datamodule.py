"""HSDDataModule: training pairs and their batch layout (what skip-aware training relies on), eval batches."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hsd_exp.data.datamodule import HSDDataModule
from hsd_exp.data.loaders import load_examples, sample_dir
from hsd_exp.data.prompts import build_prompt, training_text
from hsd_exp.errors import ConfigError

from helpers import load

ROOT = Path(__file__).resolve().parents[2]


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


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = "the council said on monday that the new bridge over the river would open next spring after delays".split()


def xsum(tmp_path, rows):
    """The XSum config over a local train split in the Hub schema: long sources, like the real articles."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "xsum.yaml")
    cfg.path = str(tmp_path)
    return cfg


def article(n_words, seed):
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n_words)).capitalize() + "."


@pytest.fixture
def long_rows():
    summary = "A new bridge over the river will open next spring, the council has said."
    return [{"id": str(i), "document": article(400 + 50 * i, i), "summary": summary} for i in range(3)]


@pytest.fixture(scope="module")
def chat_tok(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def check_fitted(dm, cfg, tokenizer, chat, max_length):
    """Every pair: fits, prompt = evaluation's prompt for a (shorter) source prefix, full target, loss on it."""
    examples = load_examples(cfg, split="train")
    assert len(dm.train_pairs) == len(examples)
    for ex, pair in zip(examples, dm.train_pairs, strict=True):
        prompt, target = training_text(ex.source, ex.references[0], cfg, tokenizer, chat)
        full_target = tokenizer(target, add_special_tokens=False)["input_ids"]
        assert pair.target_ids == full_target  # the whole summary and its EOS: not one token
        assert max_length - 3 <= len(pair.prompt_ids) + len(pair.target_ids) <= max_length  # source uses the room
        text = tokenizer.decode(pair.prompt_ids)
        if chat:  # the template header survives; the source sits between instruction and end of turn
            head = f"<|user|>\n{cfg.instruction}\n\n"
            assert text.startswith(head) and text.endswith("<|end|>\n<|assistant|>\n")
            source = text[len(head): -len("<|end|>\n<|assistant|>\n")]
        else:
            assert text.endswith(cfg.separator)
            source = text[: -len(cfg.separator)]
        assert 0 < len(source) < len(ex.source) and ex.source.startswith(source)  # cut at the end, not the start
        assert text == build_prompt(source, cfg, tokenizer, chat)  # what evaluation builds for that source
        batch = dm.collate_train([pair])
        P = int(batch["prompt_len"])
        assert batch["labels"][0, P:].tolist() == full_target and (batch["labels"][0, :P] == -100).all()


def test_long_source_is_cut_to_fit_max_length_not_the_prompt_or_target(tok, tmp_path, long_rows):
    cfg = xsum(tmp_path, long_rows)
    dm = HSDDataModule(cfg, tok, chat=False, max_length=96)
    dm.setup("fit")
    check_fitted(dm, cfg, tok, False, 96)


def test_long_source_keeps_the_chat_template(chat_tok, tmp_path, long_rows):
    cfg = xsum(tmp_path, long_rows)
    dm = HSDDataModule(cfg, chat_tok, chat=True, max_length=120)
    dm.setup("fit")
    check_fitted(dm, cfg, chat_tok, True, 120)


def test_default_max_length_trains_on_the_evaluation_prompt(tok, tmp_path, long_rows):
    # max_length=None (conf/finetune: null) derives the cap from max_source_tokens + max_new_tokens + template:
    # a 768-token source and a summary within max_new_tokens fit whole
    rows = [dict(r, document=article(1200, i)) for i, r in enumerate(long_rows)]
    cfg = xsum(tmp_path, rows)
    dm = HSDDataModule(cfg, tok, chat=False)
    dm.setup("fit")
    for ex, pair in zip(load_examples(cfg, split="train"), dm.train_pairs, strict=True):
        prompt, target = training_text(ex.source, ex.references[0], cfg, tok, chat=False)
        assert tok.decode(pair.prompt_ids) == prompt == build_prompt(ex.source, cfg, tok, chat=False)
        assert len(tok(prompt)["input_ids"]) > cfg.max_source_tokens  # the source was long: cut as in evaluation
        assert pair.target_ids == tok(target, add_special_tokens=False)["input_ids"]


def test_short_sources_unchanged_by_max_length(tok):
    # E2E / CommonGen prompts are short: any cap that fits them leaves the pairs as evaluation builds them
    derived = HSDDataModule(e2e(), tok, chat=False, train_limit=3)
    capped = HSDDataModule(e2e(), tok, chat=False, train_limit=3, max_length=256)
    derived.setup("fit")
    capped.setup("fit")
    assert derived.train_pairs == capped.train_pairs


def test_target_longer_than_the_room_is_cut_at_its_end_with_one_warning(tok, tmp_path, long_rows, caplog):
    rows = [dict(r, summary=article(120, 3)) for r in long_rows]
    cfg = xsum(tmp_path, rows)
    dm = HSDDataModule(cfg, tok, chat=False, max_length=64)
    with caplog.at_level(logging.WARNING, logger="hsd_exp.data.datamodule"):
        dm.setup("fit")
    _, target = training_text(rows[0]["document"], rows[0]["summary"], cfg, tok, chat=False)
    full_target = tok(target, add_special_tokens=False)["input_ids"]
    for pair in dm.train_pairs:
        assert len(pair.prompt_ids) + len(pair.target_ids) <= 64
        assert pair.target_ids == full_target[: len(pair.target_ids)] and len(pair.target_ids) >= 20
        assert tok.decode(pair.prompt_ids).endswith(cfg.separator)  # the source still gets half the room
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 3 training targets" in warnings[0].getMessage()


def test_max_length_below_the_template_is_a_config_error(chat_tok, tmp_path, long_rows):
    dm = HSDDataModule(xsum(tmp_path, long_rows), chat_tok, chat=True, max_length=8)
    with pytest.raises(ConfigError, match="finetune.max_length=8"):
        dm.setup("fit")


def test_bos_tokenizer_sees_the_same_prompt_in_training_and_evaluation(tok):
    bos_tok = copy.deepcopy(tok)
    bos_tok.add_bos_token = True  # like LLaMA tokenizers: BOS prepended when special tokens are added
    assert bos_tok("x")["input_ids"][0] == bos_tok.bos_token_id
    dm = HSDDataModule(e2e(), bos_tok, chat=False, train_limit=1)
    dm.setup("fit")
    example = load_examples(e2e(), split="train", limit=1)[0]
    batch = dm.collate_eval([example])
    assert batch["input_ids"][0].tolist() == dm.train_pairs[0].prompt_ids
    assert dm.train_pairs[0].prompt_ids[0] == bos_tok.bos_token_id


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


def test_dataset_limit_cuts_the_evaluation_split_not_the_training_data(tok):
    """dataset.limit=N (a shorter evaluation) once also trained on N examples when finetune.train_limit=null."""
    dm = HSDDataModule(e2e(limit=2), tok, chat=False, train_limit=None)
    dm.setup(None)
    assert len(dm.test_examples) == 2
    train = load_examples(e2e(), split="train")
    assert len(train) > 2
    assert len(dm.train_pairs) == sum(len(ex.references) for ex in train)  # every training example
    assert len(load_examples(e2e(limit=2), split="train")) == len(train)
    assert len(load_examples(e2e(limit=2, split="train"), split="train")) == 2  # its own split: cut


def test_prompts_and_pairs_fit_the_model_positions(tok, tmp_path):
    """Sources longer than the model's context (no dataset.max_source_tokens cut) are cut so that an evaluation
    prompt fits max_prompt_tokens and a training pair max_positions; the template (separator) stays whole."""
    rows = [{"meaning_representation": f"name[{i}] " + "word " * 2000, "human_reference": "A reference."}
            for i in range(3)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = e2e(path=str(tmp_path), max_source_tokens=None)
    dm = HSDDataModule(cfg, tok, chat=False, max_positions=128, max_prompt_tokens=120, train_limit=3)
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_pairs and all(len(p.prompt_ids) + len(p.target_ids) <= 128 for p in dm.train_pairs)
    batch = dm.collate_eval(dm.test_examples)
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert max(lengths) <= 120 and min(lengths) >= 110, lengths  # cut to fit, not to nothing
    assert all(dm.eval_prompt(ex.source).endswith(cfg.separator) for ex in dm.test_examples)
