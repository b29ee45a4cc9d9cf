"""hsd_exp.report.tables on synthetic run dirs (no models, no network): numbers, formulas, order, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsd_exp.eval.metrics import QUALITY_KEYS
from hsd_exp.report import tables as report
from hsd_exp.report.runs import collect_runs

from helpers import PNG_MAGIC, POLICIES, make_multirun, metrics_for, read_csv, set_config, write_run


def md_rows(md: str) -> list[list[str]]:
    """Cells of the table body rows (header and separator dropped)."""
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows if not line.startswith("| Method")]


def test_table_numbers_are_the_metrics_json_values(multirun, tmp_path):
    paths = report.write_report(collect_runs([multirun]), tmp_path / "out")
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
    rows = {Path(r["path"]).name: r for r in report.build_table(collect_runs([multirun]))}
    assert rows["0_full"]["speedup"] == 1.0 and rows["0_full"]["pct_full"] == pytest.approx(100.0)
    for name, (*_, speed, scale) in POLICIES.items():
        assert rows[name]["speedup"] == pytest.approx(speed / 100.0)
        assert rows[name]["pct_full"] == pytest.approx(scale * 100)
        for k in QUALITY_KEYS:
            assert rows[name][f"{k}_pct_full"] == pytest.approx(scale * 100)
    assert rows["5_hsd"]["speedup"] is None and rows["5_hsd"]["pct_full"] is None


def test_rows_sorted_full_calm_skipdecode_hsd_by_layers_descending(multirun):
    methods = [r["method"] for r in report.build_table(collect_runs([multirun]))]
    assert methods == ["Full", "CALM (d=0.02)", "SkipDecode (10,20)", "HSD (s=1, 0, 18)", "HSD (s=2, 0, 12)",
                       "HSD (s=1, 0, 8)"]  # the partial run (no Avg. Layer) last in its family


def test_partial_run_is_a_row_with_blank_cells(multirun, tmp_path):
    paths = report.write_report(collect_runs([multirun]), tmp_path / "out")
    cells = md_rows(paths["md"].read_text())[-1]
    assert cells[0] == "HSD (s=1, 0, 8)" and cells[-1] == "partial (3 predictions)"
    assert all(c == "" for c in cells[1:-1])
    assert read_csv(paths["csv"])[-1]["status"] == "partial (3 predictions)"


def test_png_is_written(multirun, tmp_path):
    paths = report.write_report(collect_runs([multirun]), tmp_path / "out", metric="bleu1")
    assert paths["png"].name == "quality_vs_layers.png"
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    assert "quality_vs_layers.png" in paths["md"].read_text()


def test_bertscore_backbone_noted_and_mixed_backbones_flagged(multirun):
    runs = collect_runs([multirun])
    rows = report.build_table(runs)
    assert any("`all-MiniLM-L6-v2`" in n for n in report.group_notes(rows, runs))
    runs[2].bertscore_model = "roberta-large"
    rows = report.build_table(runs)
    assert any("DIFFERENT BERTScore backbones" in n for n in report.group_notes(rows, runs))
    skip = next(r for r in rows if r["policy"] == "skipdecode")
    assert skip["bertscore_f1_pct_full"] is None  # not comparable: left out of % of full
    assert skip["pct_full"] == pytest.approx(70.0)


def test_no_full_run_leaves_speedup_blank(tmp_path):
    runs = collect_runs([make_multirun(tmp_path / "m", with_full=False)])
    rows = report.build_table(runs)
    assert all(r["speedup"] is None and r["pct_full"] is None for r in rows)
    assert any("No full-decoding run" in n for n in report.group_notes(rows, runs))


def test_speedup_baseline_needs_same_decode_settings(multirun):
    metrics = {**metrics_for("hsd", {"s": 1, "min": 0, "max": 18}, 16.7, 50.0, 1.0), "num_beams": 1}
    write_run(multirun / "6_greedy", "name: hsd\n  s: 1\n  min: 0\n  max: 18", metrics, beams=1)
    rows = report.build_table(collect_runs([multirun]))
    greedy = next(r for r in rows if r["num_beams"] == 1)
    assert greedy["speedup"] is None and greedy["method"] == "HSD (s=1, 0, 18) [beams=1]"
    assert rows[0]["method"] == "Full [beams=4]" and rows[0]["speedup"] == 1.0


def scale_quality(run_dir: Path, factor: float) -> None:
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics.update({k: metrics[k] * factor for k in QUALITY_KEYS})
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
    runs = collect_runs([tmp_path / "a", tmp_path / "b"])
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
    rows = report.build_table(collect_runs([tmp_path / "a", tmp_path / "b"]))
    methods = [r["method"] for r in rows]
    assert len(set(methods)) == len(methods) == 10
    assert "Full (a/0_full)" in methods and "Full (b/0_full)" in methods
    assert all(r["setting"] == "" for r in rows)


def test_full_run_without_tokens_per_s_still_gives_percent_of_full(multirun):
    """A Full run scored on resume has no tokens/s: it stays the quality baseline, only Speedup goes blank."""
    path = multirun / "0_full" / "metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps({**metrics, "tokens_per_s": None}))
    runs = collect_runs([multirun])
    rows = {Path(r["path"]).name: r for r in report.build_table(runs)}
    for name, (*_, scale) in POLICIES.items():
        assert rows[name]["speedup"] is None
        assert rows[name]["pct_full"] == pytest.approx(scale * 100)
    notes = report.group_notes(list(rows.values()), runs)
    assert any("without tokens/s" in n and "0_full" in n for n in notes)
    assert not any("No full-decoding run" in n for n in notes)
