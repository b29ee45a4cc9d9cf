"""hsd_exp.report.runs on synthetic run dirs (no models, no network): finding runs, reading config and metrics."""

from __future__ import annotations

import json

import pytest

from hsd_exp.report.runs import SETTING_FIELDS, RunRecord, collect_runs, rebuild_policy
from hsd_exp.run_folder import MEASURED, SETTING

from helpers import FULL_QUALITY, metrics_for, set_config, write_run


def test_collect_runs_reads_raw_config_and_metrics(multirun):
    runs = collect_runs([multirun])
    assert [r.path.name for r in runs] == ["0_full", "1_calm", "2_skipdecode", "3_hsd", "4_hsd", "5_hsd"]
    hsd = runs[3]
    assert (hsd.policy, hsd.num_beams, hsd.ckpt_path) == ("hsd", 4, None)
    assert hsd.params == {"s": 1, "min": 0, "max": 18, "keep_first": 0}  # metrics.json's policy_params
    assert hsd.config["paths"]["root_dir"] == "${hsd_root:}"  # kept raw, never resolved
    assert (hsd.model, hsd.dataset, hsd.complete, hsd.status) == ("smollm2-135m", "e2e", True, "complete")
    assert hsd.rougeL == FULL_QUALITY["rougeL"] * 0.95
    assert runs[1].params["d"] == 0.02 and runs[1].params["criterion"] == "softmax"
    partial = runs[5]
    assert (partial.complete, partial.num_predictions, partial.rougeL) == (False, 3, None)
    assert (partial.model, partial.dataset) == ("smollm2-135m", "e2e")  # from the config
    assert partial.params == {"s": 1, "min": 0, "max": 8}


def test_metrics_with_complete_false_is_partial(tmp_path):
    metrics = metrics_for("hsd", {"s": 1, "min": 0, "max": 18}, 16.7, 170.0, 1.0)
    write_run(tmp_path / "run", "name: hsd\n  s: 1\n  min: 0\n  max: 18", {**metrics, "complete": False}, 4)
    (run,) = collect_runs([tmp_path / "run"])
    assert run.status == "partial (4 predictions)" and run.rougeL == metrics["rougeL"]


def test_single_run_dir_and_metrics_only_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(metrics_for("calm", {"d": 0.005, "criterion": "state"}, 25.0, 90, 1)))
    (run,) = collect_runs([run_dir])
    assert (run.method, run.plot_line, run.params["d"], run.num_predictions) == (
        "CALM (d=0.005, state)", "CALM (state)", 0.005, 0)


@pytest.mark.parametrize("name, params, label, expected", [
    ("hsd", {"s": 2, "min": 0, "max": 12}, "hsd(s=2,0,12)", "HSD (s=2, 0, 12)"),
    ("calm", {"d": 0.02, "first_exit": 3}, None, "CALM (d=0.02, first_exit=3)"),
    ("full", {}, "full", "Full"),
    ("hsd", {}, "hsd(s=2,0,12)", None),  # no parameters recorded: the defaults are not what ran
    ("hsd", {"s": -1}, None, None),  # invalid
    ("hsd", {"max": "${oops:}"}, None, None),  # unresolved
    ("nope", {}, "nope(x=1)", None),  # unknown name
])
def test_rebuild_policy_or_none(name, params, label, expected):
    built = rebuild_policy(name, params, label)
    assert (built.display_name if built else None) == expected


def test_a_run_whose_policy_cannot_be_rebuilt_keeps_its_label(tmp_path):
    """metrics.json from before policy_params, an unknown policy, invalid parameters: rows named by label."""
    metrics = metrics_for("hsd", {"s": 2, "min": 0, "max": 12}, 11.3, 230.0, 0.85)
    del metrics["policy_params"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "foo").mkdir()
    (tmp_path / "foo" / "metrics.json").write_text(json.dumps({**metrics, "policy": "foo", "policy_label": "foo(x=1)"}))
    write_run(tmp_path / "bad", "name: hsd\n  s: -1", None)
    runs = {r.path.name: r for r in collect_runs([tmp_path])}
    assert [(runs[n].method, runs[n].plot_line, runs[n].order) for n in ("old", "foo", "bad")] == [
        ("hsd(s=2,0,12)", "HSD", 3), ("foo(x=1)", "foo", 100), ("hsd", "HSD", 3)]


def test_options_beyond_the_paper_name_their_own_row_and_line(tmp_path):
    """A variant (keep_first, CALM's first_exit) must never share a row with the paper's setting, also
    when the run is half-finished and only its config says what it ran."""
    variant = metrics_for("hsd", {"s": 1, "min": 0, "max": 18, "keep_first": 2}, 19.0, 170.0, 1.0)
    write_run(tmp_path / "m" / "0", "name: hsd\n  s: 1\n  min: 0\n  max: 18", variant, 4)
    write_run(tmp_path / "m" / "1", "name: hsd\n  s: 1\n  min: 0\n  max: 18\n  keep_first: 1", None, 2)
    write_run(tmp_path / "m" / "2", "name: calm\n  d: 0.02\n  first_exit: 3", None, 2)
    runs = collect_runs([tmp_path / "m"])
    assert [r.method for r in runs] == ["HSD (s=1, 0, 18, keep_first=2)", "HSD (s=1, 0, 18, keep_first=1)",
                                        "CALM (d=0.02, first_exit=3)"]
    assert [r.plot_line for r in runs] == ["HSD s=1 (keep_first=2)", "HSD s=1 (keep_first=1)", "CALM (first_exit=3)"]


def test_metrics_without_complete_key_is_complete_and_interpolated_params(tmp_path):
    metrics = metrics_for("skipdecode", {"min": 10, "max": 30}, 20.0, 150.0, 1.0)
    del metrics["complete"], metrics["policy_params"]  # the parameters come from the config alone
    write_run(tmp_path / "a", "name: skipdecode\n  min: 10\n  max: ${model.num_layers}", metrics)
    write_run(tmp_path / "b", "name: skipdecode\n  min: ${oops:}\n  max: 20", None)
    a, b = collect_runs([tmp_path])
    assert a.complete and a.status == "complete" and a.params["max"] == 30  # plain interpolation: resolved
    assert a.method == "SkipDecode (10,30)"
    assert b.params["min"] == "${oops:}" and b.status == "partial (5 predictions)"  # unknown resolver: kept raw
    assert b.method == "skipdecode"  # no policy to rebuild from a raw interpolation: the name


def test_compare_task_subfolders_are_runs_and_inherit_the_parent_config(tmp_path):
    """task=compare: one config in the run dir, one subfolder per compare_policies entry (label slug)."""
    parent = write_run(tmp_path / "cmp", "name: full", None, predictions=0, beams=1)
    (parent / "predictions.jsonl").unlink()
    with open(parent / ".hydra" / "config.yaml", "a") as f:
        f.write("compare_policies:\n  - {name: full}\n  - {name: hsd, s: 1, min: 0, max: 18}\n")
    full = {**metrics_for("full", {}, 30.0, 100.0, 1.0), "num_beams": 1}
    (parent / "full").mkdir()
    (parent / "full" / "metrics.json").write_text(json.dumps(full))
    (parent / "hsd_s_1_0_18").mkdir()  # crashed mid-way: predictions only
    (parent / "hsd_s_1_0_18" / "predictions.rank0.jsonl").write_text('{"id": "a"}\n')
    (parent / "hsd_s_1_0_18" / "predictions.rank1.jsonl").write_text('{"id": "b"}\n{"id": "c"}\n')
    runs = collect_runs([parent])
    assert [r.path.name for r in runs] == ["full", "hsd_s_1_0_18"]  # the parent itself is no row
    full_run, hsd = runs
    assert (full_run.method, full_run.status, full_run.num_beams) == ("Full", "complete", 1)
    assert (hsd.method, hsd.status, hsd.dataset, hsd.num_beams) == ("HSD (s=1, 0, 18)", "partial (3 predictions)",
                                                                    "e2e", 1)


def test_job_that_crashed_before_predicting_is_a_partial_row(multirun):
    write_run(multirun / "7_calm", "name: calm\n  d: 0.005", None, predictions=0)
    runs = collect_runs([multirun])
    crashed = next(r for r in runs if r.path.name == "7_calm")
    assert (crashed.method, crashed.status) == ("CALM (d=0.005)", "partial (0 predictions)")


def test_setting_reads_weights_inputs_and_decoding_from_the_config(tmp_path):
    """model.path, split, limit, do_sample and max_new_tokens come from .hydra/config.yaml (existing runs'
    metrics.json lack them); max_new_tokens' ${dataset.max_new_tokens} is resolved."""
    from omegaconf import OmegaConf

    run_dir = write_run(tmp_path / "run", "name: full", metrics_for("full", {}, 30.0, 100.0, 1.0))
    path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path)
    for key, value in (("model.path", "/models/ft"), ("dataset.split", "validation"), ("dataset.limit", 100),
                       ("decode.do_sample", True)):
        OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.save(cfg, path)
    (run,) = collect_runs([run_dir])
    assert (run.model_path, run.split, run.limit, run.do_sample, run.max_new_tokens) == (
        "/models/ft", "validation", 100, True, 48)  # the config's split wins over metrics.json's "test"
    setting = dict(zip([attr for attr, _ in SETTING_FIELDS], run.setting, strict=True))
    assert {k: setting[k] for k in ("model_path", "ckpt_path", "split", "limit", "num_beams", "do_sample",
                                    "max_new_tokens")} == {
        "model_path": "/models/ft", "ckpt_path": "", "split": "validation", "limit": "100", "num_beams": "4",
        "do_sample": "True", "max_new_tokens": "48"}


def test_limit_is_the_one_the_scored_predictions_were_made_under(tmp_path):
    """A refused rerun with a smaller dataset.limit has already rewritten .hydra/config.yaml (Hydra saves it before
    the task runs): metrics.json's limit, recorded by the run that scored, names the row and pairs it."""

    run_dir = write_run(tmp_path / "run", "name: full", {**metrics_for("full", {}, 30.0, 100.0, 1.0), "limit": 16,
                                                         "num_examples": 16})
    set_config(run_dir, dataset__limit=8)
    (run,) = collect_runs([run_dir])
    assert run.limit == 16
    set_config(run_dir, dataset__limit=None)
    path = run_dir / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "limit": None}))  # null: every example
    (run,) = collect_runs([run_dir])
    assert run.limit is None


def test_setting_reads_data_and_prompt_format_from_the_config(tmp_path):
    run_dir = write_run(tmp_path / "run", "name: full", metrics_for("full", {}, 30.0, 100.0, 1.0))
    set_config(run_dir, dataset__path="/data/news", model__chat=True, dataset__instruction="Summarize.",
               dataset__separator="\n\nSummary:", dataset__max_source_tokens=512)
    (run,) = collect_runs([run_dir])
    setting = dict(zip([short for _, short in SETTING_FIELDS], run.setting, strict=True))
    assert {k: setting[k] for k in ("data", "chat", "instruction", "separator", "max_source_tokens")} == {
        "data": "/data/news", "chat": "True", "instruction": "Summarize.", "separator": "\n\nSummary:",
        "max_source_tokens": "512"}


def test_run_without_config_takes_its_setting_from_metrics_json(tmp_path):
    metrics = {**metrics_for("full", {}, 30.0, 100.0, 1.0), "dataset_path": "sample", "chat": True,
               "separator": " S:", "limit": 4, "examples_hash": "abcd"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run,) = collect_runs([run_dir])
    assert (run.dataset_path, run.chat, run.separator, run.limit, run.examples_hash) == ("sample", True, " S:", 4,
                                                                                          "abcd")


def test_a_run_record_reads_every_setting_field_and_measurement():
    """run_folder.SETTING and MEASURED are the one list: RunRecord holds each under its name, and the pairing key
    is exactly the fields with a short name, in their order (model and dataset name the table instead)."""
    from dataclasses import fields

    from hsd_exp.eval.metrics import QUALITY_KEYS

    attrs = {f.name for f in fields(RunRecord)}
    assert {f.name for f in SETTING} | set(MEASURED) | set(QUALITY_KEYS) <= attrs
    assert [attr for attr, _ in SETTING_FIELDS] == [f.name for f in SETTING if f.name not in ("model", "dataset")]
