"""hsd_exp.report on synthetic run dirs (no models, no network): numbers, formulas, order, outputs, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hsd_exp import report
from hsd_exp.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Hydra saves the composed config with interpolations kept; some use resolvers only registered by the app.
CONFIG = """\
task_name: hsd
task: evaluate
seed: 42
ckpt_path: {ckpt}
paths:
  root_dir: ${{hsd_root:}}
  log_dir: ${{paths.root_dir}}/outputs
  output_dir: ${{hydra:runtime.output_dir}}
model:
  _target_: hsd_exp.models.load_model
  name: {model}
  num_layers: 30
  cache_dir: ${{paths.cache_dir}}
dataset:
  name: {dataset}
  max_new_tokens: 48
  path: ${{paths.output_dir}}/data
decode:
  batch_size: 4
  max_new_tokens: ${{dataset.max_new_tokens}}
  num_beams: {beams}
policy:
{policy}
"""

POLICIES = {  # dir name -> (policy yaml, policy_label, avg_layers, tokens/s, quality scale vs. full)
    "0_full": ("name: full", "full", 30.0, 100.0, 1.0),
    "1_calm": ("name: calm\n  d: 0.02\n  criterion: softmax\n  first_exit: 1", "calm(d=0.02,softmax)",
               21.5, 110.0, 0.9),
    "2_skipdecode": ("name: skipdecode\n  min: 10\n  max: 20", "skipdecode(10,20)", 15.0, 180.0, 0.7),
    "3_hsd": ("name: hsd\n  s: 1\n  min: 0\n  max: 18", "hsd(s=1,0,18)", 16.7, 170.0, 0.95),
    "4_hsd": ("name: hsd\n  s: 2\n  min: 0\n  max: 12", "hsd(s=2,0,12)", 11.3, 230.0, 0.85),
}
FULL_QUALITY = {"rouge1": 41.23456789, "rouge2": 17.654321, "rougeL": 33.3333333333, "bleu1": 29.87654,
                "bertscore_f1": 88.123456}


def write_run(run_dir: Path, policy_yaml: str, metrics: dict | None, predictions: int = 5, *,
              model: str = "smollm2-135m", dataset: str = "e2e", beams: int = 4, ckpt: str = "null",
              torn_line: bool = False) -> Path:
    """A run dir as `python -m hsd_exp -m task=evaluate ...` leaves it."""
    (run_dir / ".hydra").mkdir(parents=True)
    policy = "\n".join("  " + line.strip() for line in ("_target_: hsd_exp.policies.build_policy\n" + policy_yaml)
                       .splitlines())
    (run_dir / ".hydra" / "config.yaml").write_text(
        CONFIG.format(model=model, dataset=dataset, beams=beams, ckpt=ckpt, policy=policy))
    lines = [json.dumps({"id": str(i), "source": "s", "references": ["r"], "prediction": "p",
                         "layers_per_token": [30]}) + "\n" for i in range(predictions)]
    text = "".join(lines) + ('{"id": "torn", "sour' if torn_line else "")
    (run_dir / "predictions.jsonl").write_text(text)
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return run_dir


def metrics_for(policy: str, label: str, layers: float, speed: float, scale: float, *, model="smollm2-135m",
                dataset="e2e", backbone="all-MiniLM-L6-v2") -> dict:
    return {**{k: v * scale for k, v in FULL_QUALITY.items()}, "bertscore_model": backbone,
            "avg_layers": layers, "tokens_per_s": speed, "num_examples": 5, "num_layers": 30, "policy": policy,
            "policy_label": label, "policy_params": report.parse_policy_label(label), "dataset": dataset,
            "split": "test", "model": model, "num_beams": 4, "ckpt_path": None, "complete": True}


def make_multirun(root: Path, *, dataset: str = "e2e", with_full: bool = True, partial: bool = True) -> Path:
    """full + calm + skipdecode + hsd s=1 + hsd s=2 (+ a half-finished hsd run without metrics.json)."""
    for name, (policy_yaml, label, layers, speed, scale) in POLICIES.items():
        if name == "0_full" and not with_full:
            continue
        policy = policy_yaml.split("\n")[0].removeprefix("name: ")
        write_run(root / name, policy_yaml, metrics_for(policy, label, layers, speed, scale, dataset=dataset),
                  dataset=dataset)
    if partial:
        write_run(root / "5_hsd", "name: hsd\n  s: 1\n  min: 0\n  max: 8", None, predictions=3, dataset=dataset,
                  torn_line=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_rows(md: str) -> list[list[str]]:
    """Cells of the table body rows (header and separator dropped)."""
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows if not line.startswith("| Method")]


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    return make_multirun(tmp_path / "multirun")


def test_collect_runs_reads_raw_config_and_metrics(multirun):
    runs = report.collect_runs([multirun])
    assert [r.path.name for r in runs] == ["0_full", "1_calm", "2_skipdecode", "3_hsd", "4_hsd", "5_hsd"]
    hsd = runs[3]
    assert (hsd.policy, hsd.s, hsd.min, hsd.max, hsd.num_beams, hsd.ckpt_path) == ("hsd", 1, 0, 18, 4, None)
    assert hsd.config["paths"]["root_dir"] == "${hsd_root:}"  # kept raw, never resolved
    assert (hsd.model, hsd.dataset, hsd.complete, hsd.status) == ("smollm2-135m", "e2e", True, "complete")
    assert hsd.rougeL == FULL_QUALITY["rougeL"] * 0.95
    assert runs[1].d == 0.02 and runs[1].criterion == "softmax"
    partial = runs[5]
    assert (partial.complete, partial.num_predictions, partial.rougeL) == (False, 3, None)
    assert (partial.model, partial.dataset, partial.max) == ("smollm2-135m", "e2e", 8)  # from the config


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


def test_metrics_with_complete_false_is_partial(tmp_path):
    metrics = metrics_for("hsd", "hsd(s=1,0,18)", 16.7, 170.0, 1.0)
    write_run(tmp_path / "run", "name: hsd\n  s: 1\n  min: 0\n  max: 18", {**metrics, "complete": False}, 4)
    (run,) = report.collect_runs([tmp_path / "run"])
    assert run.status == "partial (4 predictions)" and run.rougeL == metrics["rougeL"]


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


def test_single_run_dir_and_metrics_only_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(metrics_for("calm", "calm(d=0.005,state)", 25.0, 90, 1)))
    (run,) = report.collect_runs([run_dir])
    assert (run.method, run.family, run.d, run.num_predictions) == ("CALM (d=0.005, state)", "CALM (state)",
                                                                     0.005, 0)


@pytest.mark.parametrize("label, expected", [
    ("hsd(s=2,0,12)", {"s": 2, "min": 0, "max": 12}),
    ("skipdecode(10,24)", {"min": 10, "max": 24}),
    ("calm(d=0.02,softmax)", {"d": 0.02, "criterion": "softmax"}),
    ("full", {}),
])
def test_parse_policy_label(label, expected):
    assert report.parse_policy_label(label) == expected


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


def test_metrics_without_complete_key_is_complete_and_interpolated_params(tmp_path):
    metrics = metrics_for("skipdecode", "skipdecode(10,30)", 20.0, 150.0, 1.0)
    del metrics["complete"]
    write_run(tmp_path / "a", "name: skipdecode\n  min: 10\n  max: ${model.num_layers}", metrics)
    write_run(tmp_path / "b", "name: skipdecode\n  min: ${oops:}\n  max: 20", None)
    a, b = report.collect_runs([tmp_path])
    assert a.complete and a.status == "complete" and a.max == 30  # plain interpolation: resolved for this key
    assert b.min == "${oops:}" and b.status == "partial (5 predictions)"  # unknown resolver: kept raw


def test_compare_task_subfolders_are_runs_and_inherit_the_parent_config(tmp_path):
    """task=compare: one config in the run dir, one subfolder per compare_policies entry (label slug)."""
    parent = write_run(tmp_path / "cmp", "name: full", None, predictions=0, beams=1)
    (parent / "predictions.jsonl").unlink()
    with open(parent / ".hydra" / "config.yaml", "a") as f:
        f.write("compare_policies:\n  - {name: full}\n  - {name: hsd, s: 1, min: 0, max: 18}\n")
    full = {**metrics_for("full", "full", 30.0, 100.0, 1.0), "num_beams": 1}
    (parent / "full").mkdir()
    (parent / "full" / "metrics.json").write_text(json.dumps(full))
    (parent / "hsd_s_1_0_18").mkdir()  # crashed mid-way: predictions only
    (parent / "hsd_s_1_0_18" / "predictions.rank0.jsonl").write_text('{"id": "a"}\n')
    (parent / "hsd_s_1_0_18" / "predictions.rank1.jsonl").write_text('{"id": "b"}\n{"id": "c"}\n')
    runs = report.collect_runs([parent])
    assert [r.path.name for r in runs] == ["full", "hsd_s_1_0_18"]  # the parent itself is no row
    full_run, hsd = runs
    assert (full_run.method, full_run.status, full_run.num_beams) == ("Full", "complete", 1)
    assert (hsd.method, hsd.status, hsd.dataset, hsd.num_beams) == ("HSD (s=1, 0, 18)", "partial (3 predictions)",
                                                                    "e2e", 1)


def test_job_that_crashed_before_predicting_is_a_partial_row(multirun):
    write_run(multirun / "7_calm", "name: calm\n  d: 0.005", None, predictions=0)
    runs = report.collect_runs([multirun])
    crashed = next(r for r in runs if r.path.name == "7_calm")
    assert (crashed.method, crashed.status) == ("CALM (d=0.005)", "partial (0 predictions)")
