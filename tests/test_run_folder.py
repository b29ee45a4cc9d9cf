"""hsd_exp.run_folder: the file names, the one list of setting fields, and run.json / metrics.json as built from a
config (the format DEVELOPERS.md "Run directory format" documents; folders written before must still read back)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hsd_exp.run_folder import (
    PAIRED,
    SETTING,
    flat_config,
    is_predictions_file,
    predictions_file,
    recorded_setting,
    resume_key,
    setting_values,
    slug,
)

from helpers import compose_config


def config(**overrides):
    """A composed config's setting-relevant part (model, dataset, decode, ckpt_path), dotted keys overridden."""
    cfg = OmegaConf.create({
        "ckpt_path": None,
        "model": {"name": "tiny-gpt2", "path": None, "chat": False},
        "dataset": {"name": "e2e", "path": "sample", "split": "test", "limit": 8, "instruction": "Describe.",
                    "separator": " D:", "max_source_tokens": 128, "max_new_tokens": 32},
        "decode": {"_target_": "transformers.GenerationConfig", "batch_size": 4, "num_beams": 1, "do_sample": False,
                   "max_new_tokens": "${dataset.max_new_tokens}", "temperature": 1.0, "top_p": 1.0},
    })
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return cfg


@dataclass
class Toy:  # what recorded_setting asks of a policy
    name: str = "hsd"
    label: str = "hsd(s=1,0,4)"
    parameters: dict = field(default_factory=lambda: {"s": 1, "min": 0, "max": 4})

    def params(self) -> dict:
        return dict(self.parameters)


def test_file_names_per_rank_and_what_counts_as_a_predictions_file():
    assert predictions_file() == predictions_file(0, 1) == "predictions.jsonl"
    assert [predictions_file(r, 2) for r in (0, 1)] == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    assert all(is_predictions_file(predictions_file(r, w)) for r, w in ((0, 1), (0, 2), (3, 4)))
    for name in ("metrics.json", "run.json", "report.csv", "predictions.json", "layer_run_rates.json"):
        assert not is_predictions_file(name), name


def test_slug_names_compare_subfolders_after_policy_labels():
    assert slug("hsd(s=1,0,18)") == "hsd_s_1_0_18"
    assert slug("calm(d=0.02,softmax)") == "calm_d_0.02_softmax"


def test_flat_config_dots_nested_keys_and_writes_lists_as_text():
    assert flat_config({"model": {"name": "m", "tiny": {"layers": 4}}, "ids": [1, 2], "seed": 0}) == {
        "model.name": "m", "model.tiny.layers": 4, "ids": "[1, 2]", "seed": 0}


def test_setting_fields_are_named_once_and_the_pairing_leaves_out_the_table_key():
    names = [f.name for f in SETTING]
    assert len(set(names)) == len(names) and len({f.config for f in SETTING}) == len(names)
    assert [f.name for f in PAIRED] == [n for n in names if n not in ("model", "dataset")]
    assert {f.name for f in SETTING if f.sampling_only} == {"temperature", "top_p"}
    assert {f.name for f in SETTING if f.wins == "ran"} == {"model", "dataset", "num_beams", "ckpt_path"}
    assert [f.name for f in SETTING if f.wins == "scored"] == ["limit"]


def test_every_setting_field_is_a_key_of_the_composed_config(tmp_path):
    cfg = compose_config(tmp_path, "model=tiny-gpt2", "dataset.path=sample", "+model.path=/m", "+model.adapter=a")
    missing = [f.config for f in SETTING if OmegaConf.select(cfg, f.config, default="<missing>") == "<missing>"]
    assert missing == []


def test_run_json_is_the_format_earlier_runs_wrote():
    """A resume compares run.json key by key: the key must stay what earlier versions wrote, or every folder
    written before would be refused (this dict is what they wrote for this config)."""
    written_before = {"policy": "hsd(s=1,0,4)", "model": "tiny-gpt2", "model_path": None, "adapter": None,
                      "ckpt_path": None, "dataset": "e2e", "dataset_path": "sample", "split": "test",
                      "decode": {"num_beams": 1, "do_sample": False, "max_new_tokens": 32, "temperature": 1.0,
                                 "top_p": 1.0}}
    key = json.loads(json.dumps(resume_key(config(), "hsd(s=1,0,4)", model="tiny-gpt2", ckpt_path=None)))
    prompt_format = {"chat", "instruction", "separator", "max_source_tokens"}  # recorded since issue 26
    assert set(key) - set(written_before) == prompt_format
    assert {k: v for k, v in key.items() if k not in prompt_format} == written_before
    # ... and a folder an earlier version wrote still resumes, adopting the prompt format
    from hsd_exp.eval.resume import check_resume_setting

    folder = Path(tempfile.mkdtemp())
    (folder / "run.json").write_text(json.dumps(written_before))
    check_resume_setting(folder, key, resuming=True)


def test_run_json_resolves_paths_and_ignores_what_changes_no_prediction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key = resume_key(config(model__path="weights/../ft", dataset__path="data"), "full", model="m",
                     ckpt_path="ckpt/last.ckpt")
    assert (key["model_path"], key["dataset_path"], key["ckpt_path"]) == (
        str(tmp_path / "ft"), str(tmp_path / "data"), str(tmp_path / "ckpt" / "last.ckpt"))
    assert resume_key(config(), "full", model="m", ckpt_path=None)["dataset_path"] == "sample"  # a name

    same = resume_key(config(), "full", model="m", ckpt_path=None)
    for unchanged in ({"decode__batch_size": 1}, {"dataset__limit": 100}):  # a larger limit extends a run
        assert resume_key(config(**unchanged), "full", model="m", ckpt_path=None) == same, unchanged
    for changed in ({"decode__max_new_tokens": 6}, {"decode__num_beams": 4}, {"dataset__split": "validation"},
                    {"model__adapter": "x"}, {"decode__draft_len": 2}):  # decode: the whole node but batch_size
        assert resume_key(config(**changed), "full", model="m", ckpt_path=None) != same, changed
    assert resume_key(config(), "hsd", model="m", ckpt_path=None) != same
    assert resume_key(config(), "full", model="other", ckpt_path=None) != same


def test_metrics_json_records_every_setting_field_as_the_config_gives_it():
    meta = recorded_setting(config(model__path="~/ft"), Toy(), model="loaded-name", chat=True, num_layers=6,
                            ckpt_path="run/last.ckpt")
    assert set(meta) == {"policy", "policy_label", "policy_params", "num_layers", "model", "dataset", "split",
                         "num_beams", "ckpt_path", "model_path", "adapter", "chat", "dataset_path", "limit",
                         "instruction", "separator", "max_source_tokens", "do_sample", "max_new_tokens",
                         "temperature", "top_p"}
    assert (meta["policy"], meta["policy_label"], meta["policy_params"], meta["num_layers"]) == (
        "hsd", "hsd(s=1,0,4)", {"s": 1, "min": 0, "max": 4}, 6)
    # as the run loaded them, over the config's
    assert (meta["model"], meta["chat"], meta["ckpt_path"]) == ("loaded-name", True, "run/last.ckpt")
    # the rest as the config gives it: paths unresolved, interpolations resolved
    assert (meta["model_path"], meta["max_new_tokens"], meta["limit"], meta["separator"]) == ("~/ft", 32, 8, " D:")
    assert json.loads(json.dumps(meta)) == meta  # plain JSON values


def test_setting_values_take_only_setting_fields():
    assert setting_values(config(), model="m")["model"] == "m"
    with pytest.raises(TypeError, match="not SETTING fields"):
        setting_values(config(), modle="m")
