"""The report names a lossless run's mode and acceptance, never takes it for the Full baseline, and checks its
promise: every prediction equal to its Full run's."""

import json

from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import write_report

from helpers import metrics_for, policy_yaml, write_run

LOSSLESS = {"lossless": True, "draft_len": 4, "acceptance": 0.625, "tokens_per_verification": 2.5}


def make_runs(root):
    write_run(root / "full", policy_yaml("full"), metrics_for("full", {}, 30, 10.0, 1.0))
    write_run(root / "ll", policy_yaml("hsd", {"s": 1, "min": 0, "max": 18}),
              {**metrics_for("hsd", {"s": 1, "min": 0, "max": 18}, 30, 14.0, 1.0), **LOSSLESS})
    write_run(root / "ll_full", policy_yaml("full"), {**metrics_for("full", {}, 30, 8.0, 1.0), **LOSSLESS})


def test_a_lossless_row_is_named_paired_with_full_and_checked(tmp_path):
    make_runs(tmp_path / "grid")
    report = (tmp_path / "out")
    md = open(write_report(collect_runs([str(tmp_path / "grid")]), report)["md"]).read()
    row = next(line for line in md.splitlines() if "HSD (s=1, 0, 18) → lossless (k=4, acceptance 0.62)" in line)
    assert "| 1.40 |" in row and "| 100.00 |" in row  # Speedup over its Full run; quality = Full's
    assert "Full → lossless (k=4" in md  # a lossless run drafting with Full is not the baseline
    assert "all 5 predictions identical to its Full run's, as promised" in md


def test_a_lossless_row_that_differs_from_full_is_flagged(tmp_path):
    make_runs(tmp_path / "grid")
    path = tmp_path / "grid" / "ll" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "prediction": "something else"})
    path.write_text("\n".join(lines) + "\n")
    md = open(write_report(collect_runs([str(tmp_path / "grid")]), tmp_path / "out")["md"]).read()
    assert "is not lossless here: 1 of 5 predictions differ from its Full run's" in md
