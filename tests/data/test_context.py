"""The model's context (hsd_exp.data.context): task=generate refuses a prompt that does not fit with
max_new_tokens, evaluation cuts dataset sources to fit, and a max_new_tokens leaving no room is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hsd_exp import tasks
from hsd_exp.errors import ConfigError

from helpers import compose_config

BASE = ["model=tiny-llama", "dataset.path=sample", "dataset.limit=4", "decode.batch_size=2",
        "decode.max_new_tokens=8", "bertscore.enabled=false", "trainer.accelerator=cpu", "callbacks=plain"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp: Path, *overrides: str):
    return compose_config(tmp, *BASE, *overrides)


def test_generate_refuses_a_prompt_longer_than_the_context(tmp_path):
    """A 5,000-word prompt on tiny-gpt2 (512 positions) ended in an IndexError inside GPT-2's position table."""
    with pytest.raises(ConfigError) as err:
        tasks.run(make_cfg(tmp_path, "task=generate", "model=tiny-gpt2", f"prompt='{'word ' * 5000}'"))
    msg = str(err.value)
    assert "512 positions" in msg and "decode.max_new_tokens=8" in msg and "shorten the prompt" in msg, msg


def test_evaluate_cuts_long_sources_to_fit_the_context(tmp_path, caplog):
    """A source longer than the model's context (dataset.max_source_tokens allowing it) is cut to fit, with one
    warning naming the budget that fits; it used to end in an IndexError mid-run."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"meaning_representation": f"name[{i}] " + "word " * 3000, "human_reference": "ref"} for i in range(2)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="hsd_exp"):
        m = tasks.run(make_cfg(tmp_path, "task=evaluate", "model=tiny-gpt2", f"dataset.path={data}",
                               "dataset.max_source_tokens=6000", "dataset.limit=null", "policy=full"))
    assert m["num_examples"] == 2
    cut = [r for r in caplog.records if "sources are cut to" in r.getMessage()]
    assert len(cut) == 1 and "dataset.max_source_tokens=6000" in cut[0].getMessage()


def test_max_new_tokens_leaving_no_room_for_a_prompt_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"decode.max_new_tokens=600 leaves no room.*512 positions.*at most"):
        tasks.run(make_cfg(tmp_path, "task=evaluate", "model=tiny-gpt2", "decode.max_new_tokens=600"))
