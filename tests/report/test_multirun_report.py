"""End to end: a tiny Hydra multirun over two policies, then the report built from its folders."""

import csv
import json
import os
import subprocess
import sys

import pytest

from helpers import CACHE_DIR, ROOT


def run(args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HSD_CACHE_DIR": CACHE_DIR}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_multirun_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    res = run(["-m", "hsd_exp", "-m", "task=evaluate", "model=tiny-gpt2", "model.tiny.layers=24",
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
    res = run(["-m", "hsd_exp.report", str(sweep), "--out", str(out)])
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
    speedup = metrics["1_hsd_s_1_0_12"]["tokens_per_s"] / metrics["0_full"]["tokens_per_s"]
    assert float(by_policy["hsd"]["speedup"]) == speedup
    assert (out / "quality_vs_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Avg. Layer" in (out / "report.md").read_text()


def test_optuna_sweep_searches_under_the_layer_budget(tmp_path):
    """+sweep=optuna end to end on a tiny model: every trial evaluates, Optuna records the best objective."""
    import yaml

    from hsd_exp.__main__ import objective

    sweep = tmp_path / "optuna"
    res = run(["-m", "hsd_exp", "+sweep=optuna", "model=tiny-llama", "dataset.path=sample", "dataset.limit=2",
               "decode.max_new_tokens=4", "decode.batch_size=2", "bertscore.enabled=false", "avg_layer_budget=4",
               "hydra.sweeper.n_trials=3",
               'hydra.sweeper.params={policy.s:"choice(1,2)",policy.min:"choice(0)",policy.max:"range(2,6)"}',
               f"hydra.sweep.dir={sweep}"])
    assert res.returncode == 0, res.stderr[-3000:]
    trials = [json.loads((j / "metrics.json").read_text()) for j in sorted(sweep.iterdir()) if j.is_dir()]
    assert len(trials) == 3 and all(t["policy"] == "hsd" for t in trials)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(objective(t, 4) for t in trials)
    in_budget = [t for t in trials if t["avg_layers"] <= 4]
    assert in_budget, [t["avg_layers"] for t in trials]
    (winner,) = [t for t in trials if objective(t, 4) == best["best_value"]][:1]
    assert winner["avg_layers"] <= 4  # an over-budget trial never wins while one within the budget exists


@pytest.mark.parametrize(("over", "within"), [
    ({"rougeL": 16.92, "avg_layers": 15.94}, {"rougeL": 15.02, "avg_layers": 14.9}),  # the audit's case
    ({"rougeL": 100.0, "avg_layers": 15.001}, {"rougeL": 0.0, "avg_layers": 15.0}),  # the extremes
])
def test_objective_ranks_every_over_budget_run_below_every_run_within(over, within):
    from hsd_exp.__main__ import objective

    over, within = {**over, "num_layers": 30}, {**within, "num_layers": 30}
    assert objective(over, 15) < 0 <= objective(within, 15)
    assert objective(within, 15) == within["rougeL"]
    assert objective(over, None) == over["rougeL"]  # no budget: plain ROUGE-L
    closer = {**over, "avg_layers": (over["avg_layers"] + 15) / 2}
    assert objective(over, 15) < objective(closer, 15)  # over the budget, fewer layers still score higher
