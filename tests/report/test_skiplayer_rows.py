"""SkipLayer in the report: its rows are named after the method and drawn as a line of their own, next to HSD."""

from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import build_table

from helpers import make_multirun, metrics_for, policy_yaml, write_run


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
    assert {r["family"] for r in skip} == {"SkipLayer"} and all(r["pct_full"] is not None for r in skip)
