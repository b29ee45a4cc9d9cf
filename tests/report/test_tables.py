"""hsd_exp.report.tables on synthetic run dirs (no models, no network): numbers, formulas, order, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsd_exp.eval.metrics import QUALITY_KEYS
from hsd_exp.report import tables as report
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import build_table, write_report

from helpers import (
    PNG_MAGIC,
    POLICIES,
    make_multirun,
    metrics_for,
    policy_yaml,
    read_csv,
    set_config,
    write_run,
)


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
    ("model__adapter", None, "smollm2_e2e_robust", "adapter"),  # a LoRA adapter merged on load
    ("decode__do_sample", False, True, "sample"),
    ("decode__max_new_tokens", 48, 64, "max_new_tokens"),
    ("dataset__split", "test", "validation", "split"),
    ("dataset__limit", None, 100, "limit"),
    ("dataset__path", "sample", "/data/news", "data"),  # own data under the dataset's name
    ("model__chat", False, True, "chat"),
    ("dataset__instruction", "Describe the restaurant.", "Summarize the article.", "instruction"),
    ("dataset__separator", " Description:", " Summary:", "separator"),
    ("dataset__max_source_tokens", 128, 512, "max_source_tokens"),
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


def test_full_run_without_timing_still_gives_percent_of_full(multirun):
    """A Full run scored on resume has no timing: it stays the quality baseline, only Speedup goes blank."""
    path = multirun / "0_full" / "metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps({**metrics, "tokens_per_s": None, "ms_per_step": None}))
    runs = collect_runs([multirun])
    rows = {Path(r["path"]).name: r for r in report.build_table(runs)}
    for name, (*_, scale) in POLICIES.items():
        assert rows[name]["speedup"] is None
        assert rows[name]["pct_full"] == pytest.approx(scale * 100)
    notes = report.group_notes(list(rows.values()), runs)
    assert any("without timing" in n and "0_full" in n for n in notes)
    assert not any("No full-decoding run" in n for n in notes)


def test_a_run_on_other_data_gets_no_full_run_and_a_note_saying_why(tmp_path):
    """The newcomer's case: own data under the dataset's name (dataset.path) next to a Full run of other data.
    No Speedup or % of full for it, and a note under the table names what differs from the nearest Full run."""
    grid = make_multirun(tmp_path / "m", partial=False)
    for run_dir in grid.iterdir():
        if run_dir.is_dir():
            set_config(run_dir, dataset__path="/data/news" if run_dir.name != "2_skipdecode" else "sample")
    runs = collect_runs([grid])
    rows = {Path(r["path"]).name: r for r in report.build_table(runs)}
    skip = rows["2_skipdecode"]
    assert skip["method"] == "SkipDecode (10,20) [data=sample]"
    assert skip["speedup"] is None and skip["pct_full"] is None
    assert rows["3_hsd"]["speedup"] == pytest.approx(1.7)  # the others still pair with their Full run
    notes = report.group_notes(list(rows.values()), runs)
    (note,) = [n for n in notes if "no Full run of its setting" in n]
    assert note.startswith("SkipDecode (10,20) [data=sample]: no Full run of its setting, so no Speedup or % of full")
    assert f"`{grid / '0_full'}`" in note and "data (`sample` here, `/data/news` there)" in note
    assert not any("No full-decoding run" in n for n in notes)


def test_full_run_must_have_scored_the_same_examples(tmp_path):
    """Same config, other examples (an edited file, a resumed run that scored more): metrics.json's examples_hash
    tells them apart; runs from before it fall back to the number of examples scored."""
    grid = make_multirun(tmp_path / "m", partial=False)

    def set_metrics(name: str, **values) -> None:
        path = grid / name / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

    for name in POLICIES:
        set_metrics(name, examples_hash="aaaa")
    set_metrics("0_full", examples_hash="bbbb")
    runs = collect_runs([grid])
    rows = {Path(r["path"]).name: r for r in report.build_table(runs)}
    assert rows["0_full"]["pct_full"] == pytest.approx(100.0)  # its own baseline
    assert all(rows[n]["speedup"] is None and rows[n]["pct_full"] is None for n in POLICIES if n != "0_full")
    notes = [n for n in report.group_notes(list(rows.values()), runs) if "no Full run of its setting" in n]
    assert len(notes) == 4
    assert all("examples scored (as many, other ones: examples_hash `aaaa` here, `bbbb` there)" in n for n in notes)

    set_metrics("0_full", examples_hash="aaaa")  # the same examples: paired again
    rows = {Path(r["path"]).name: r for r in report.build_table(collect_runs([grid]))}
    assert rows["3_hsd"]["speedup"] == pytest.approx(1.7)

    for name in POLICIES:  # runs from before examples_hash: the count scored decides
        path = grid / name / "metrics.json"
        metrics = json.loads(path.read_text())
        del metrics["examples_hash"]
        path.write_text(json.dumps(metrics))
    set_metrics("0_full", num_examples=16)
    runs = collect_runs([grid])
    rows = {Path(r["path"]).name: r for r in report.build_table(runs)}
    assert rows["3_hsd"]["speedup"] is None
    assert any("examples scored (5 here, 16 there)" in n for n in report.group_notes(list(rows.values()), runs))


def test_temperature_and_top_p_matter_only_when_sampling(tmp_path):
    for grid, temperature in (("a", 0.7), ("b", 1.0)):
        make_multirun(tmp_path / grid, partial=False)
        for run_dir in (tmp_path / grid).iterdir():
            if run_dir.is_dir():
                set_config(run_dir, decode__temperature=temperature, decode__top_p=0.9)
    assert len({r.setting for r in collect_runs([tmp_path / "a", tmp_path / "b"])}) == 1  # greedy ignores them
    for grid in ("a", "b"):
        for run_dir in (tmp_path / grid).iterdir():
            if run_dir.is_dir():
                set_config(run_dir, decode__do_sample=True)
    rows = report.build_table(collect_runs([tmp_path / "a", tmp_path / "b"]))
    assert {r["setting"] for r in rows} == {"temperature=0.7", "temperature=1.0"}
    assert all(r["pct_full"] is not None for r in rows)  # each grid against its own Full run
    assert sum(r["method"].startswith("Full [temperature=") for r in rows) == 2


def test_long_or_multiline_setting_values_stay_on_one_short_line(tmp_path):
    for grid, separator in (("a", "\n\nDescription:"), ("b", "\n\nSummary of the whole article, in a few words:")):
        make_multirun(tmp_path / grid, partial=False)
        for run_dir in (tmp_path / grid).iterdir():
            if run_dir.is_dir():
                set_config(run_dir, dataset__separator=separator)
    settings = {r["setting"] for r in report.build_table(collect_runs([tmp_path / "a", tmp_path / "b"]))}
    assert settings == {"separator=\\n\\nDescription:", "separator=\\n\\nSummary of the whole article, in..."}


# ----------------------------------------------------------------------------- policies beyond the papers
# A lossless run: named after its mode and acceptance, never the Full baseline, its promise checked (every
# prediction equal to its Full run's).
LOSSLESS = {"lossless": True, "draft_len": 4, "acceptance": 0.625, "tokens_per_verification": 2.5,
            "layer_forwards_per_token": 41.6}


def make_lossless_runs(root):
    write_run(root / "full", policy_yaml("full"), metrics_for("full", {}, 30, 10.0, 1.0))
    write_run(root / "ll", policy_yaml("hsd", {"s": 1, "min": 0, "max": 18}),
              {**metrics_for("hsd", {"s": 1, "min": 0, "max": 18}, 30, 14.0, 1.0), **LOSSLESS})
    write_run(root / "ll_full", policy_yaml("full"), {**metrics_for("full", {}, 30, 8.0, 1.0), **LOSSLESS})


def test_a_lossless_row_is_named_paired_with_full_and_checked(tmp_path):
    make_lossless_runs(tmp_path / "grid")
    report = (tmp_path / "out")
    md = open(write_report(collect_runs([str(tmp_path / "grid")]), report)["md"]).read()
    row = next(line for line in md.splitlines() if "HSD (s=1, 0, 18) → lossless (k=4, acceptance 0.62)" in line)
    assert "| 1.40 |" in row and "| 100.00 |" in row  # Speedup over its Full run; quality = Full's
    (note,) = [line for line in md.splitlines() if "Speedup by wall time per generated token" in line]
    assert "HSD (s=1, 0, 18) → lossless" in note  # its Speedup is tokens/s(run) / tokens/s(Full), and says so
    assert "ran 41.60 decoder-layer forwards per token" in md  # its real cost beside Avg. Layer = L
    assert "Full → lossless (k=4" in md  # a lossless run drafting with Full is not the baseline
    assert "all 5 predictions identical to its Full run's, as promised" in md


def test_a_lossless_row_that_differs_from_full_is_flagged(tmp_path):
    make_lossless_runs(tmp_path / "grid")
    path = tmp_path / "grid" / "ll" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "prediction": "something else"})
    path.write_text("\n".join(lines) + "\n")
    md = open(write_report(collect_runs([str(tmp_path / "grid")]), tmp_path / "out")["md"]).read()
    assert "is not lossless here: 1 of 5 predictions differ from its Full run's" in md


# SkipLayer: its rows are named after the method and drawn as a line of their own, next to HSD.
def test_skiplayer_rows_and_line(tmp_path):
    root = make_multirun(tmp_path / "grid", partial=False)
    for i, threshold in enumerate((0.5, 0.7)):
        params = {"threshold": threshold}
        write_run(root / f"9{i}_skiplayer", policy_yaml("skiplayer", params),
                  metrics_for("skiplayer", params, 20.0 - 4 * i, 150.0, 0.9))
    rows = build_table(collect_runs([root]))
    names = [r["method"] for r in rows]
    assert "SkipLayer (threshold=0.5)" in names and "SkipLayer (threshold=0.7)" in names
    assert names.index("SkipLayer (threshold=0.5)") > names.index("HSD (s=2, 0, 12)")  # after the paper's methods
    skip = [r for r in rows if r["method"].startswith("SkipLayer")]
    assert {r["plot_line"] for r in skip} == {"SkipLayer"} and all(r["pct_full"] is not None for r in skip)


# ----------------------------------------------------------------------------- speed that output length cannot fool
HSD = ("hsd", {"s": 1, "min": 0, "max": 18})


def speed_runs(root: Path, **hsd: float) -> list[dict]:
    """A Full run (100 tokens/s, 20 ms per decode step, 10 tokens per example) and an HSD run with ``hsd``'s
    numbers over those; the table's rows by folder name."""
    full = {**metrics_for("full", {}, 30.0, 100.0, 1.0), "ms_per_step": 20.0, "mean_new_tokens": 10.0,
            "flop_ideal": 1.0}
    write_run(root / "0_full", policy_yaml("full"), full)
    write_run(root / "1_hsd", policy_yaml(*HSD), {**metrics_for(*HSD, 16.7, 100.0, 0.9), "mean_new_tokens": 10.0,
                                                  "flop_ideal": 1.37, **hsd})
    runs = collect_runs([root])
    rows = build_table(runs)
    return {Path(r["path"]).name: r for r in rows}, report.group_notes(rows, runs)


def test_garbage_that_writes_longer_at_slower_steps_is_not_a_speedup(tmp_path):
    """The issue's case: HSD writes 4x longer outputs (every row busy while Full pads its finished ones), so its
    tokens/s is 1.8x Full's, yet each decode step of the batch is slower (25 ms vs 20 ms): Speedup < 1, flagged."""
    rows, notes = speed_runs(tmp_path / "m", tokens_per_s=180.0, ms_per_step=25.0, mean_new_tokens=40.0)
    hsd = rows["1_hsd"]
    assert hsd["tokens_per_s"] / rows["0_full"]["tokens_per_s"] == pytest.approx(1.8)  # what tokens/s would say
    assert hsd["speedup"] == pytest.approx(0.8) and hsd["speedup_by"] == "ms/step"
    assert hsd["length_ratio"] == pytest.approx(4.0) and hsd["flags"] == "length x4.00 of Full"
    assert rows["0_full"]["flags"] is None and rows["0_full"]["speedup"] == 1.0
    assert any("Flag `length`" in n and "HSD (s=1, 0, 18) (x4.00)" in n for n in notes)
    assert any(n.startswith("Speedup = ms/step(Full) / ms/step(run)") for n in notes)


@pytest.mark.parametrize(("ms", "flagged"), [(10.0, True), (14.0, False)])
def test_a_speedup_above_its_flop_ideal_is_flagged(tmp_path, ms, flagged):
    """20 / 10 = 2.0x against a FLOP ideal of 1.37 (x 1.10 = 1.51): flagged; 20 / 14 = 1.43x is within noise."""
    rows, notes = speed_runs(tmp_path / "m", ms_per_step=ms)
    hsd = rows["1_hsd"]
    assert hsd["speedup"] == pytest.approx(20.0 / ms) and hsd["flop_ideal"] == 1.37
    assert (hsd["flags"] == "Speedup > FLOP ideal 1.37") is flagged
    assert any("Flag `Speedup > FLOP ideal`" in n and "HSD (s=1, 0, 18)" in n for n in notes) is flagged
    md = write_report(collect_runs([tmp_path / "m"]), tmp_path / "out")["md"].read_text()
    assert "| Flags |" in md and ("| Speedup > FLOP ideal 1.37 |" in md) is flagged


def test_a_run_without_per_step_timing_gets_no_speedup_from_tokens_per_s(tmp_path):
    """metrics.json from before ms_per_step: tokens/s alone is not turned into a Speedup, and a note says why."""
    rows, notes = speed_runs(tmp_path / "m", ms_per_step=None, tokens_per_s=180.0)
    assert rows["1_hsd"]["speedup"] is None and rows["1_hsd"]["pct_full"] == pytest.approx(90.0)
    assert any(n.startswith("No per-step timing (ms_per_step)") and "HSD (s=1, 0, 18)" in n for n in notes)


def test_a_full_run_of_another_batch_size_gives_no_speedup():
    """A step of 16 rows costs more than one of 8: ms/step compares runs of one batch size only."""
    from hsd_exp.report.runs import RunRecord
    from hsd_exp.report.speedup import speedup

    def run(batch, ms):
        return RunRecord(Path("r"), "complete", ms_per_step=ms, config={"decode": {"batch_size": batch}})

    assert speedup(run(8, 10.0), run(8, 20.0)) == (2.0, "ms/step")
    assert speedup(run(8, 10.0), run(16, 20.0)) == (None, None)
