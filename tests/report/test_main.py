"""``python -m hsd_exp.report`` (hsd_exp.report.__main__): options, outputs, errors as one line and exit 2; end to
end, a tiny Hydra multirun over two policies, then the report built from its folders."""

from __future__ import annotations

import csv
import json

import pytest

from hsd_exp.errors import ConfigError
from hsd_exp.report.__main__ import main
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import check_not_mixed

from helpers import PNG_MAGIC, make_multirun, read_csv, run_python


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


def test_tiny_multirun_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_python(["-m", "hsd_exp", "-m", "task=evaluate", "model=tiny-gpt2", "model.tiny.layers=24",
               "model.num_layers=24", "dataset.path=sample", "dataset.limit=4", "decode.max_new_tokens=6",
               "decode.batch_size=2", "bertscore.enabled=false", "policy=full,hsd_s1_max12",
               f"hydra.sweep.dir={sweep}"])
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0_full", "1_hsd_s_1_0_12"]  # job number + the policy label's slug
    metrics = {j.name: json.loads((j / "metrics.json").read_text()) for j in jobs}
    for m in metrics.values():
        assert m["num_examples"] == 4 and m["complete"] is True
    assert metrics["0_full"]["avg_layers"] == 24
    assert metrics["1_hsd_s_1_0_12"]["avg_layers"] < 24

    out = tmp_path / "report"
    res = run_python(["-m", "hsd_exp.report", str(sweep), "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 2
    by_policy = {"full" if r["method"].lower().startswith("full") else "hsd": r for r in rows}
    for name, job in (("full", "0_full"), ("hsd", "1_hsd_s_1_0_12")):
        for key in ("avg_layers", "rouge1", "rouge2", "rougeL", "bleu1", "tokens_per_s"):
            assert float(by_policy[name][key]) == metrics[job][key], (name, key)
        # % of full: the mean retention over the metrics both runs have, full != 0 (BERTScore is off here).
        # A random tiny model may score 0 everywhere: then no metric is kept and the cell is blank.
        full = metrics["0_full"]
        kept = [metrics[job][k] / full[k] * 100 for k in ("rouge1", "rouge2", "rougeL", "bleu1", "bertscore_f1")
                if isinstance(metrics[job].get(k), int | float) and isinstance(full.get(k), int | float) and full[k]]
        if kept:
            assert float(by_policy[name]["pct_full"]) == pytest.approx(sum(kept) / len(kept)), name
        else:
            assert by_policy[name]["pct_full"] == "", name
    # Speedup: one decode step of the batch against Full's (metrics.json's ms_per_step), not tokens/s
    speedup = metrics["0_full"]["ms_per_step"] / metrics["1_hsd_s_1_0_12"]["ms_per_step"]
    assert float(by_policy["hsd"]["speedup"]) == speedup and by_policy["hsd"]["speedup_by"] == "ms/step"
    for m in metrics.values():  # 2 batches of 2, at most 6 tokens: at most 5 decode steps each
        assert 0 < m["decode_steps"] <= 10 and m["prefill_ms"] > 0 and 0 < m["mean_new_tokens"] <= 6
    assert metrics["0_full"]["flop_ideal"] == 1.0 and metrics["1_hsd_s_1_0_12"]["flop_ideal"] > 1.0
    assert (out / "quality_vs_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Avg. Layer" in (out / "report.md").read_text()
