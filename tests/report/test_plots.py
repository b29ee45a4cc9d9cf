"""hsd_exp.report.plots: one line per method family, variants (options beyond the paper's) on lines of their own."""

from __future__ import annotations

from matplotlib.figure import Figure

from hsd_exp.report.plots import FAMILY_STYLE, _plot_group
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import build_table

from helpers import metrics_for, write_run


def test_variants_get_their_own_dashed_line_in_a_colour_no_family_uses(tmp_path):
    runs = [("full", "full", 30.0), ("hsd", "hsd(s=1,0,18)", 19.8), ("hsd", "hsd(s=1,0,8)", 17.2),
            ("hsd", "hsd(s=1,0,18,keep_first=1)", 21.4)]
    for i, (name, label, layers) in enumerate(runs):
        write_run(tmp_path / "m" / str(i), f"name: {name}", metrics_for(name, label, layers, 100.0, 0.5 + i / 10))
    rows = build_table(collect_runs([tmp_path / "m"]))
    ax = Figure().subplots()
    _plot_group(ax, rows, "rougeL")
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"HSD s=1", "HSD s=1 (keep_first=1)"}  # Full: a star and an unlabelled axhline
    paper, variant = lines["HSD s=1"], lines["HSD s=1 (keep_first=1)"]
    assert list(paper.get_xdata()) == [17.2, 19.8] and list(variant.get_xdata()) == [21.4]
    assert paper.get_linestyle() == "-" and variant.get_linestyle() == "--"
    assert paper.get_marker() == variant.get_marker() == FAMILY_STYLE["HSD s=1"][1]
    assert variant.get_color() not in {color for color, _ in FAMILY_STYLE.values()}


def test_one_line_per_setting_and_family(tmp_path):
    """Two checkpoints of one model: a line (and a Full star) per checkpoint, each named after it."""
    for grid in ("a", "b"):
        for i, (name, label, layers) in enumerate([("full", "full", 30.0), ("hsd", "hsd(s=1,0,18)", 19.8),
                                                   ("hsd", "hsd(s=1,0,8)", 17.2)]):
            write_run(tmp_path / grid / str(i), f"name: {name}", metrics_for(name, label, layers, 100.0, 1.0),
                      ckpt=f"/ckpt/{grid}.ckpt")
    rows = build_table(collect_runs([tmp_path / "a", tmp_path / "b"]))
    ax = Figure().subplots()
    _plot_group(ax, rows, "rougeL")
    lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()
             if not line.get_label().startswith("_")}
    assert lines == {"HSD s=1 [ckpt=/ckpt/a.ckpt]": [17.2, 19.8], "HSD s=1 [ckpt=/ckpt/b.ckpt]": [17.2, 19.8]}
    stars = {c.get_label() for c in ax.collections}
    assert stars == {"Full [ckpt=/ckpt/a.ckpt]", "Full [ckpt=/ckpt/b.ckpt]"}
