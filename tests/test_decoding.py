"""DecodeSettings: the decode node parsed once (what generate() gets, what it does not), and every task decoding
through it: decode=lossless is greedy full decoding's output in task=evaluate and task=generate alike, and settings
it cannot reproduce stop before the model loads."""

import json
from pathlib import Path

import pytest
from transformers import GenerationConfig

from hsd_exp import preflight, tasks
from hsd_exp.decoding import DecodeSettings
from hsd_exp.errors import ConfigError
from hsd_exp.eval.predictions import read_predictions
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import write_report
from hsd_exp.skip.lossless import LosslessSettings

from helpers import compose_config, load

BASE = ["model=tiny-llama", "dataset.path=sample", "dataset.limit=5", "bertscore.enabled=false", "decode.batch_size=3",
        "decode.max_new_tokens=10", "task=evaluate", "logger=csv", "callbacks=none", "trainer.accelerator=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- parsing
def test_good_decoding_values_pass(tmp_path):
    for overrides in ([], ["decode=beam4"], ["decode=sample"], ["decode=sample", "decode.top_p=1.0"]):
        DecodeSettings.from_config(compose_config(tmp_path, "model=tiny-gpt2", *overrides).decode)


def test_generate_gets_the_generation_keys_and_the_tokenizers_pad_and_eos(tmp_path):
    decode = DecodeSettings.from_config(compose_config(tmp_path, "decode=beam4", "decode.max_new_tokens=7",
                                                       "+decode.top_k=5").decode)
    assert (decode.batch_size, decode.max_new_tokens, decode.lossless) == (4, 7, None)
    tok = load("tiny-gpt2").tokenizer
    gen = decode.generation_config(tok)
    assert isinstance(gen, GenerationConfig) and (gen.num_beams, gen.max_new_tokens, gen.top_k) == (4, 7, 5)
    assert (gen.pad_token_id, gen.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert not hasattr(gen, "batch_size")  # the data module's batch size, not generate()'s
    gen.max_new_tokens = 1
    assert decode.generation_config(tok).max_new_tokens == 7  # each caller gets its own copy


def test_lossless_settings_are_parsed_out_of_generate_s_keys(tmp_path):
    cfg = compose_config(tmp_path, "decode=lossless", "decode.draft_len=3", "decode.draft_confidence=0.5")
    decode = DecodeSettings.from_config(cfg.decode)
    assert decode.lossless == LosslessSettings(draft_len=3, draft_confidence=0.5)
    gen = decode.generation_config(load("tiny-gpt2").tokenizer)
    assert not any(hasattr(gen, k) for k in ("lossless", "draft_len", "draft_confidence"))


@pytest.mark.parametrize(("overrides", "key"), [([], "dataset.max_new_tokens"),
                                                (["decode.max_new_tokens=8"], "decode.max_new_tokens")])
def test_the_override_that_sets_max_new_tokens_is_named(tmp_path, overrides, key):
    """decode.max_new_tokens interpolates dataset.max_new_tokens: messages name the key the user would set."""
    assert DecodeSettings.from_config(compose_config(tmp_path, *overrides).decode).max_new_tokens_key == key


@pytest.mark.parametrize(("override", "message"), [
    ("decode.num_beams=4", "decode=lossless needs num_beams=1"),
    ("decode.draft_len=0", "decode.draft_len=0 must be a positive integer"),
    ("decode.draft_confidence=1.5", "decode.draft_confidence=1.5 is out of range"),
    # refused only inside generate() once the model had loaded
    ("decode.repetition_penalty=1.3", r"decode=lossless does not apply decode.repetition_penalty=1.3: .*"
                                      r"set decode.repetition_penalty=1.0"),
    ("+decode.no_repeat_ngram_size=2", "decode=lossless does not apply decode.no_repeat_ngram_size=2"),
    ("+decode.stop_strings=[x]", r"decode.stop_strings=\['x'\] is not supported"),
])
def test_lossless_refuses_beams_and_bad_draft_len_before_loading(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        preflight.check(compose_config(tmp_path, *BASE, "policy=hsd", "policy.max=4", "decode=lossless", override))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- every task
def test_lossless_predictions_are_full_decodings(tmp_path):
    full = tasks.run(compose_config(tmp_path / "full", *BASE, "policy=full"))
    out = tasks.run(compose_config(tmp_path / "ll", *BASE, "policy=hsd", "policy.max=4", "decode=lossless",
                                   "decode.draft_len=3"))
    texts = {p["id"]: p["prediction"] for p in read_predictions(tmp_path / "full" / "predictions.jsonl")}
    assert {p["id"]: p["prediction"] for p in read_predictions(tmp_path / "ll" / "predictions.jsonl")} == texts
    metrics = json.loads((tmp_path / "ll" / "metrics.json").read_text())
    assert metrics["lossless"] is True and metrics["draft_len"] == 3
    assert 0 <= metrics["acceptance"] <= 1 and metrics["tokens_per_verification"] >= 1
    assert metrics["draft_avg_layers"] < 6  # the drafts skipped; the output did not
    # Avg. Layer names the depth that decided each token; what ran is layer_forwards_per_token (counted against
    # forward hooks in tests/eval/test_speed.py): each committed token cost a draft share and a verify share.
    assert out["avg_layers"] == full["avg_layers"]
    assert metrics["draft_avg_layers"] < metrics["layer_forwards_per_token"] <= 6 * (1 + metrics["draft_len"])
    assert out["rougeL"] == full["rougeL"]
    report = Path(write_report(collect_runs([str(tmp_path)]), tmp_path / "report")["md"]).read_text()
    assert "HSD (s=1, 0, 4) → lossless (k=3, acceptance " in report  # the mode is named, the policy drafted
    assert "all 5 predictions identical to its Full run's, as promised" in report  # and the report checked it


def test_generate_decodes_losslessly_too(tmp_path):
    """task=generate decode=lossless ran the policy's lossy draft as the answer: it ignored decode=lossless."""
    gen = ["task=generate", "model=tiny-llama", "decode.max_new_tokens=12", "+decode.min_new_tokens=12",
           "bertscore.enabled=false", "callbacks=none"]
    hsd = ["policy=hsd", "policy.s=1", "policy.min=0", "policy.max=3"]
    full = tasks.run(compose_config(tmp_path, *gen, "policy=full"))
    draft = tasks.run(compose_config(tmp_path, *gen, *hsd))
    lossless = tasks.run(compose_config(tmp_path, *gen, *hsd, "decode=lossless", "decode.draft_len=3"))
    assert draft["completion"] != full["completion"]  # the policy alone decodes otherwise ...
    assert lossless["completion"] == full["completion"]  # ... lossless decoding is the full model's output
    assert lossless["avg_layers"] == lossless["num_layers"] == 6
    assert lossless["lossless"] is True and lossless["draft_len"] == 3 and 0 <= lossless["acceptance"] <= 1
    assert lossless["draft_avg_layers"] < 6
