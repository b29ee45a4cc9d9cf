"""hsd_exp.report.tables on synthetic run dirs (no models, no network): numbers, formulas, order, outputs, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hsd_exp.errors import ConfigError
from hsd_exp.report import tables as report

from helpers import POLICIES, make_multirun, metrics_for, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_rows(md: str) -> list[list[str]]:
    """Cells of the table body rows (header and separator dropped)."""
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows if not line.startswith("| Method")]


def test_table_numbers_are_the_metrics_json_values(multirun, tmp_path):
    paths = report.write_report(report.collect_runs([multirun]), tmp_path / "out")
    rows = {Path(r["path"]).name: r for r in read_csv(paths["csv"])}
    md = {cells[0]: cells for cells in md_rows(paths["md"].read_text())}
    keys = ("avg_layers", "rouge1", "rouge2", "rougeL", "bleu1", "bertscore_f1", "tokens_per_s")
    for name in POLICIES:
        metrics = json.loads((multirun / name / "metrics.json").read_text())
        row = rows[name]
        for k in keys:
            assert float(row[k]) == metrics[k], (name, k)  # CSV: full precision, exact round trip
        cells = md[row["method"]]
        assert cells[1:8] == [f"{metrics[k]:.2f}" for k in keys]  # Markdown: 2 decimals
        assert row["bertscore_model"] == metrics["bertscore_model"]


def test_speedup_and_percent_of_full(multirun):
    rows = {Path(r["path"]).name: r for r in report.build_table(report.collect_runs([multirun]))}
    assert rows["0_full"]["speedup"] == 1.0 and rows["0_full"]["pct_full"] == pytest.approx(100.0)
    for name, (*_, speed, scale) in POLICIES.items():
        assert rows[name]["speedup"] == pytest.approx(speed / 100.0)
        assert rows[name]["pct_full"] == pytest.approx(scale * 100)
        for k in report.QUALITY_KEYS:
            assert rows[name][f"{k}_pct_full"] == pytest.approx(scale * 100)
    assert rows["5_hsd"]["speedup"] is None and rows["5_hsd"]["pct_full"] is None


def test_rows_sorted_full_calm_skipdecode_hsd_by_layers_descending(multirun):
    methods = [r["method"] for r in report.build_table(report.collect_runs([multirun]))]
    assert methods == ["Full", "CALM (d=0.02)", "SkipDecode (10,20)", "HSD (s=1, 0, 18)", "HSD (s=2, 0, 12)",
                       "HSD (s=1, 0, 8)"]  # the partial run (no Avg. Layer) last in its family


def test_partial_run_is_a_row_with_blank_cells(multirun, tmp_path):
    paths = report.write_report(report.collect_runs([multirun]), tmp_path / "out")
    cells = md_rows(paths["md"].read_text())[-1]
    assert cells[0] == "HSD (s=1, 0, 8)" and cells[-1] == "partial (3 predictions)"
    assert all(c == "" for c in cells[1:-1])
    assert read_csv(paths["csv"])[-1]["status"] == "partial (3 predictions)"


def test_png_is_written(multirun, tmp_path):
    paths = report.write_report(report.collect_runs([multirun]), tmp_path / "out", metric="bleu1")
    assert paths["png"].name == "quality_vs_layers.png"
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    assert "quality_vs_layers.png" in paths["md"].read_text()


def test_bertscore_backbone_noted_and_mixed_backbones_flagged(multirun):
    runs = report.collect_runs([multirun])
    rows = report.build_table(runs)
    assert any("`all-MiniLM-L6-v2`" in n for n in report.group_notes(rows, runs))
    runs[2].bertscore_model = "roberta-large"
    rows = report.build_table(runs)
    assert any("DIFFERENT BERTScore backbones" in n for n in report.group_notes(rows, runs))
    skip = next(r for r in rows if r["policy"] == "skipdecode")
    assert skip["bertscore_f1_pct_full"] is None  # not comparable: left out of % of full
    assert skip["pct_full"] == pytest.approx(70.0)


def test_no_full_run_leaves_speedup_blank(tmp_path):
    runs = report.collect_runs([make_multirun(tmp_path / "m", with_full=False)])
    rows = report.build_table(runs)
    assert all(r["speedup"] is None and r["pct_full"] is None for r in rows)
    assert any("No full-decoding run" in n for n in report.group_notes(rows, runs))


def test_speedup_baseline_needs_same_decode_settings(multirun):
    metrics = {**metrics_for("hsd", "hsd(s=1,0,18)", 16.7, 50.0, 1.0), "num_beams": 1}
    write_run(multirun / "6_greedy", "name: hsd\n  s: 1\n  min: 0\n  max: 18", metrics, beams=1)
    rows = report.build_table(report.collect_runs([multirun]))
    greedy = next(r for r in rows if r["num_beams"] == 1)
    assert greedy["speedup"] is None and greedy["method"] == "HSD (s=1, 0, 18) [beams=1]"
    assert rows[0]["method"] == "Full [beams=4]" and rows[0]["speedup"] == 1.0


def test_empty_dir_raises_config_error_and_cli_exits_2(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no runs found under .*empty: expected folders with .hydra/config.yaml"):
        report.collect_runs([tmp_path / "empty"])
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no runs found under") and err.count("\n") == 1 and "Traceback" not in err


def test_mixed_datasets_error_unless_allowed(tmp_path, capsys):
    make_multirun(tmp_path / "a", dataset="e2e")
    make_multirun(tmp_path / "b", dataset="xsum", partial=False)
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(ConfigError, match=r"datasets: e2e \(6 runs\), xsum \(5 runs\).*--allow-mixed"):
        report.check_not_mixed(report.collect_runs(dirs))
    assert report.main([*dirs, "--out", str(tmp_path / "out")]) == 2
    assert "e2e" in capsys.readouterr().err and not (tmp_path / "out").exists()

    assert report.main([*dirs, "--out", str(tmp_path / "out"), "--allow-mixed"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## smollm2-135m / e2e" in md and "## smollm2-135m / xsum" in md
    assert md.count("| Method |") == 2
    rows = read_csv(tmp_path / "out" / "report.csv")
    assert [r["dataset"] for r in rows] == ["e2e"] * 6 + ["xsum"] * 5
    assert all(r["speedup"] for r in rows if r["status"] == "complete")  # each group has its own full run
    assert (tmp_path / "out" / "quality_vs_layers.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_prints_table_and_writes_into_first_dir(multirun, capsys):
    assert report.main([str(multirun), "--title", "My report"]) == 0
    out = capsys.readouterr().out
    assert "# My report" in out and "| Full | 30.00 |" in out
    assert {p.name for p in multirun.iterdir()} >= {"report.md", "report.csv", "quality_vs_layers.png"}
    assert report.main([str(multirun)]) == 0  # the report's own files are not mistaken for runs
    assert len(read_csv(multirun / "report.csv")) == 6


def test_wandb_offline(multirun, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert report.main([str(multirun), "--out", str(tmp_path / "out"), "--wandb", "--wandb-project", "t"]) == 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_runs_one_per_row_with_flat_config(multirun, tmp_path, monkeypatch):
    """--wandb-runs: one run per row, its config flat and its numbers in the summary, for W&B's panels."""
    pytest.importorskip("wandb")
    runs = report.collect_runs([multirun])
    rows = report.build_table(runs)
    entries = report.wandb_row_runs(runs, rows)
    assert len(entries) == len(rows) == 6
    for entry, row in zip(entries, rows, strict=True):
        assert entry["name"] == row["method"]
        assert all(not isinstance(v, dict | list) for v in entry["config"].values())  # flat
        assert entry["config"]["policy.name"] == row["policy"]
        assert entry["config"]["report.status"] == row["status"]
        for key in ("avg_layers", "rougeL", "tokens_per_s"):
            if report.is_number(row[key]):
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
    assert report.main([str(multirun), "--out", str(tmp_path / "out"), "--wandb-runs", "--wandb-project", "t"]) == 0
    assert [k["name"] for k in started] == [e["name"] for e in entries]
    assert {k["job_type"] for k in started} == {"report-row"} and wandb.run is None


def set_config(run_dir: Path, **values) -> None:
    """Edit a run's saved .hydra/config.yaml (dotted keys given with "__" for "."), interpolations kept."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path)
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    OmegaConf.save(cfg, path)


def scale_quality(run_dir: Path, factor: float) -> None:
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics.update({k: metrics[k] * factor for k in report.QUALITY_KEYS})
    path.write_text(json.dumps(metrics))


@pytest.mark.parametrize(("key", "a", "b", "shown"), [
    ("model__path", "/models/a", "/models/b", "model.path"),
    ("decode__do_sample", False, True, "sample"),
    ("decode__max_new_tokens", 48, 64, "max_new_tokens"),
    ("dataset__split", "test", "validation", "split"),
    ("dataset__limit", None, 100, "limit"),
])
def test_full_baseline_shares_the_whole_setting(tmp_path, key, a, b, shown):
    """Two grids of one model name that differ in weights, inputs or decoding: each row is measured against the
    Full run of its own grid, and no two rows look the same (the setting that differs follows the method)."""
    for grid, value in (("a", a), ("b", b)):
        make_multirun(tmp_path / grid, partial=False)
        for run_dir in (tmp_path / grid).iterdir():
            if run_dir.is_dir():
                set_config(run_dir, **{key: value})
    scale_quality(tmp_path / "b" / "0_full", 0.5)  # grid b's Full scores half: its rows retain twice as much
    runs = report.collect_runs([tmp_path / "a", tmp_path / "b"])
    assert len({r.setting for r in runs}) == 2
    rows = report.build_table(runs)
    methods = [r["method"] for r in rows]
    assert len(set(methods)) == len(methods) == 10
    assert sum(m.startswith("Full [") for m in methods) == 2
    values = {"a": a, "b": b}
    for row in rows:
        grid = Path(row["path"]).parent.name
        assert row["setting"] == f"{shown}={'-' if values[grid] is None else values[grid]}"
        assert row["method"].endswith(f" [{row['setting']}]")
        scale = POLICIES[Path(row["path"]).name][-1] / (0.5 if grid == "b" and row["policy"] != "full" else 1.0)
        assert row["pct_full"] == pytest.approx(scale * 100), row["method"]


def test_runs_of_one_setting_twice_get_distinct_rows(tmp_path):
    make_multirun(tmp_path / "a", partial=False)
    make_multirun(tmp_path / "b", partial=False)  # a rerun of the same grid
    rows = report.build_table(report.collect_runs([tmp_path / "a", tmp_path / "b"]))
    methods = [r["method"] for r in rows]
    assert len(set(methods)) == len(methods) == 10
    assert "Full (a/0_full)" in methods and "Full (b/0_full)" in methods
    assert all(r["setting"] == "" for r in rows)


def test_full_run_without_tokens_per_s_still_gives_percent_of_full(multirun):
    """A Full run scored on resume has no tokens/s: it stays the quality baseline, only Speedup goes blank."""
    path = multirun / "0_full" / "metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps({**metrics, "tokens_per_s": None}))
    runs = report.collect_runs([multirun])
    rows = {Path(r["path"]).name: r for r in report.build_table(runs)}
    for name, (*_, scale) in POLICIES.items():
        assert rows[name]["speedup"] is None
        assert rows[name]["pct_full"] == pytest.approx(scale * 100)
    notes = report.group_notes(list(rows.values()), runs)
    assert any("without tokens/s" in n and "0_full" in n for n in notes)
    assert not any("No full-decoding run" in n for n in notes)


def test_help_describes_outputs_and_columns(capsys):
    assert report.main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("report.md", "report.csv", "quality_vs_layers.png", "Speedup", "% of full", "partial (N predictions)",
                 "--allow-mixed", "model.path, ckpt_path"):
        assert text in out, text


def test_wandb_group_is_the_runs_task_name(multirun, tmp_path):
    """conf/logger/wandb.yaml groups evaluation runs by task_name: the report run joins that group."""
    assert report.wandb_group(report.collect_runs([multirun])) == "hsd"
    make_multirun(tmp_path / "other", partial=False)
    for run_dir in (tmp_path / "other").iterdir():
        if run_dir.is_dir():
            set_config(run_dir, task_name="phi2_xsum")
    assert report.wandb_group(report.collect_runs([multirun, tmp_path / "other"])) == "hsd+phi2_xsum"
