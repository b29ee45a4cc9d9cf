"""``python -m hsd_exp.report`` (hsd_exp.report.__main__): options, outputs, errors as one line and exit 2."""

from __future__ import annotations

import pytest

from hsd_exp.errors import ConfigError
from hsd_exp.report.__main__ import main
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import check_not_mixed

from helpers import PNG_MAGIC, make_multirun, read_csv


def test_empty_dir_raises_config_error_and_cli_exits_2(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no runs found under .*empty: expected folders with .hydra/config.yaml"):
        collect_runs([tmp_path / "empty"])
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no runs found under") and err.count("\n") == 1 and "Traceback" not in err


def test_mixed_datasets_error_unless_allowed(tmp_path, capsys):
    make_multirun(tmp_path / "a", dataset="e2e")
    make_multirun(tmp_path / "b", dataset="xsum", partial=False)
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(ConfigError, match=r"datasets: e2e \(6 runs\), xsum \(5 runs\).*--allow-mixed"):
        check_not_mixed(collect_runs(dirs))
    assert main([*dirs, "--out", str(tmp_path / "out")]) == 2
    assert "e2e" in capsys.readouterr().err and not (tmp_path / "out").exists()

    assert main([*dirs, "--out", str(tmp_path / "out"), "--allow-mixed"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## smollm2-135m / e2e" in md and "## smollm2-135m / xsum" in md
    assert md.count("| Method |") == 2
    rows = read_csv(tmp_path / "out" / "report.csv")
    assert [r["dataset"] for r in rows] == ["e2e"] * 6 + ["xsum"] * 5
    assert all(r["speedup"] for r in rows if r["status"] == "complete")  # each group has its own full run
    assert (tmp_path / "out" / "quality_vs_layers.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_prints_table_and_writes_into_first_dir(multirun, capsys):
    assert main([str(multirun), "--title", "My report"]) == 0
    out = capsys.readouterr().out
    assert "# My report" in out and "| Full | 30.00 |" in out
    assert {p.name for p in multirun.iterdir()} >= {"report.md", "report.csv", "quality_vs_layers.png"}
    assert main([str(multirun)]) == 0  # the report's own files are not mistaken for runs
    assert len(read_csv(multirun / "report.csv")) == 6


def test_help_describes_outputs_and_columns(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("report.md", "report.csv", "quality_vs_layers.png", "Speedup", "% of full", "partial (N predictions)",
                 "--allow-mixed", "model.path, model.adapter, ckpt_path"):
        assert text in out, text
