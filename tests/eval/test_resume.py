"""hsd_exp.eval.resume on a bare folder: run.json written, matched or refused; a limit below the folder's refused.
(Through task=evaluate: tests/eval/test_callbacks.py.)"""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from hsd_exp.errors import ConfigError
from hsd_exp.eval.resume import check_resume_limit, check_resume_setting
from hsd_exp.run_folder import RUN_FILE

KEY = {"policy": "hsd(s=1,0,4)", "model": "tiny-gpt2", "model_path": None, "ckpt_path": None, "dataset": "e2e",
       "dataset_path": "sample", "split": "test", "decode": {"num_beams": 1, "max_new_tokens": 8}}


def test_a_new_run_records_its_key_readable_and_leaves_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        check_resume_setting(tmp_path, KEY, resuming=False)
    finally:
        os.umask(old)
    path = tmp_path / RUN_FILE
    assert json.loads(path.read_text()) == KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as readable as the predictions beside it
    assert [p.name for p in tmp_path.iterdir()] == [RUN_FILE]
    check_resume_setting(tmp_path, {**KEY, "policy": "full"}, resuming=False)  # nothing to resume: a fresh start
    assert json.loads(path.read_text())["policy"] == "full"


def test_a_resume_of_the_same_key_goes_on_and_leaves_run_json_as_it_was(tmp_path):
    before = {k: v for k, v in KEY.items() if k != "model_path"}  # written before a null field was added
    (tmp_path / RUN_FILE).write_text(json.dumps(before))
    check_resume_setting(tmp_path, {**KEY, "decode": {"max_new_tokens": 8, "num_beams": 1}}, resuming=True)
    assert json.loads((tmp_path / RUN_FILE).read_text()) == before  # a missing key reads as null: the same key


def test_a_resume_compares_the_types_json_gives_back(tmp_path):
    check_resume_setting(tmp_path, {**KEY, "decode": {"stop": ["a", "b"]}}, resuming=False)
    check_resume_setting(tmp_path, {**KEY, "decode": {"stop": ("a", "b")}}, resuming=True)  # a tuple: a list


@pytest.mark.parametrize(("field", "value"), [("policy", "full"), ("split", "validation"),
                                              ("decode", {"num_beams": 4, "max_new_tokens": 8})])
def test_a_resume_of_another_key_is_refused_naming_what_differs(tmp_path, field, value):
    check_resume_setting(tmp_path, KEY, resuming=False)
    before = (tmp_path / RUN_FILE).read_text()
    there = re.escape(f"({field}: {KEY[field]!r} there, {value!r} now)")
    with pytest.raises(ConfigError, match=rf"holds predictions of another setting {there}: resuming would mix them"
                                          r".*hydra.run.dir=.*delete"):
        check_resume_setting(tmp_path, {**KEY, field: value}, resuming=True)
    assert (tmp_path / RUN_FILE).read_text() == before


def test_a_run_json_from_before_the_prompt_format_adopts_it_then_holds_it(tmp_path):
    (tmp_path / RUN_FILE).write_text(json.dumps(KEY))  # written before run.json recorded the prompt format
    now = {**KEY, "chat": False, "separator": "\n"}
    check_resume_setting(tmp_path, now, resuming=True)
    assert json.loads((tmp_path / RUN_FILE).read_text()) == now
    with pytest.raises(ConfigError, match=r"chat: False there, True now"):
        check_resume_setting(tmp_path, {**now, "chat": True}, resuming=True)


def test_a_folder_from_before_run_json_adopts_the_current_key(tmp_path):
    check_resume_setting(tmp_path, KEY, resuming=True)
    assert json.loads((tmp_path / RUN_FILE).read_text()) == KEY


@pytest.mark.parametrize(("limit", "scored"), [(None, 5), (5, 5), (8, 5), ("5", 5), (3, 0)])
def test_a_limit_that_covers_the_folder_resumes(tmp_path, limit, scored):
    check_resume_limit(tmp_path, limit, scored)


def test_a_limit_below_the_folder_is_refused_with_the_limit_that_would_do(tmp_path):
    with pytest.raises(ConfigError, match=r"holds predictions for 5 examples but dataset.limit=3.*"
                                          r"dataset.limit=5 or more \(or null\)"):
        check_resume_limit(tmp_path, 3, 5)
