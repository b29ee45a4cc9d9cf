"""hsd_exp.report.wandb_log: the report's W&B runs, offline (nothing leaves tmp_path)."""

from __future__ import annotations

import pytest

from hsd_exp.report.__main__ import main
from hsd_exp.report.runs import collect_runs, is_number
from hsd_exp.report.tables import build_table
from hsd_exp.report.wandb_log import wandb_group, wandb_row_runs

from helpers import make_multirun, set_config


def test_wandb_offline(multirun, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert main([str(multirun), "--out", str(tmp_path / "out"), "--wandb", "--wandb-project", "t"]) == 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_runs_one_per_row_with_flat_config(multirun, tmp_path, monkeypatch):
    """--wandb-runs: one run per row, its config flat and its numbers in the summary, for W&B's panels."""
    pytest.importorskip("wandb")
    runs = collect_runs([multirun])
    rows = build_table(runs)
    entries = wandb_row_runs(runs, rows)
    assert len(entries) == len(rows) == 6
    for entry, row in zip(entries, rows, strict=True):
        assert entry["name"] == row["method"]
        assert all(not isinstance(v, dict | list) for v in entry["config"].values())  # flat
        assert entry["config"]["policy.name"] == row["policy"]
        assert entry["config"]["report.status"] == row["status"]
        for key in ("avg_layers", "rougeL", "tokens_per_s"):
            if is_number(row[key]):
                assert entry["summary"][key] == pytest.approx(row[key])

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    started, init = [], wandb.init  # counted at init: wandb keeps its first run dir for the whole process

    def counting_init(**kwargs):
        started.append(kwargs)
        return init(**kwargs)

    monkeypatch.setattr(wandb, "init", counting_init)
    assert main([str(multirun), "--out", str(tmp_path / "out"), "--wandb-runs", "--wandb-project", "t"]) == 0
    assert [k["name"] for k in started] == [e["name"] for e in entries]
    assert {k["job_type"] for k in started} == {"report-row"} and wandb.run is None


def test_wandb_group_is_the_runs_task_name(multirun, tmp_path):
    """conf/logger/wandb.yaml groups evaluation runs by task_name: the report run joins that group."""
    assert wandb_group(collect_runs([multirun])) == "hsd"
    make_multirun(tmp_path / "other", partial=False)
    for run_dir in (tmp_path / "other").iterdir():
        if run_dir.is_dir():
            set_config(run_dir, task_name="phi2_xsum")
    assert wandb_group(collect_runs([multirun, tmp_path / "other"])) == "hsd+phi2_xsum"


def test_wandb_files_go_into_the_report_folder_not_the_current_one(multirun, tmp_path, monkeypatch):
    """`report DIR --wandb` ran from elsewhere: its offline W&B runs belong beside report.md (--out)."""
    pytest.importorskip("wandb")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "out"
    assert main([str(multirun), "--out", str(out), "--wandb", "--wandb-runs", "--wandb-project", "t"]) == 0
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1 + 6  # the report's run and one per row
    assert not (cwd / "wandb").exists() and list(cwd.iterdir()) == []


def test_wandb_runs_print_one_line_not_wandbs_own(multirun, tmp_path):
    """--wandb-runs once printed W&B's banner and summary for every row (231 lines for a grid): now one line."""
    import os
    import subprocess
    import sys

    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", **{v: str(tmp_path / v.lower()) for v in
                                        ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")})
    res = subprocess.run([sys.executable, "-m", "hsd_exp.report", str(multirun), "--out", str(tmp_path / "out"),
                          "--wandb-runs", "--wandb-project", "t"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (res.stdout + res.stderr).splitlines()
    assert not [ln for ln in lines if ln.lower().startswith("wandb:")]  # W&B's own chatter: none
    assert len([ln for ln in lines if ln.startswith("W&B: 6 runs logged")]) == 1
