"""hsd_exp.report.plots: one line per method family, variants (options beyond the paper's) on lines of their own."""

from __future__ import annotations

from matplotlib.figure import Figure

from hsd_exp.report.plots import VARIANT_COLORS, _plot_group
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import build_table
from hsd_exp.skip.policies import build_policy

from helpers import metrics_for, write_run


def plot(rows, runs):
    ax = Figure().subplots()
    _plot_group(ax, rows, "rougeL", runs)
    return ax


def test_variants_get_their_own_dashed_line_in_a_colour_no_family_uses(tmp_path):
    settings = [("full", {}, 30.0), ("hsd", {"s": 1, "min": 0, "max": 18}, 19.8),
                ("hsd", {"s": 1, "min": 0, "max": 8}, 17.2), ("hsd", {"s": 1, "min": 0, "max": 18, "keep_first": 1}, 21.4)]
    for i, (name, params, layers) in enumerate(settings):
        write_run(tmp_path / "m" / str(i), f"name: {name}", metrics_for(name, params, layers, 100.0, 0.5 + i / 10))
    runs = collect_runs([tmp_path / "m"])
    ax = plot(build_table(runs), runs)
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"HSD s=1", "HSD s=1 (keep_first=1)"}  # Full: a star and an unlabelled axhline
    paper, variant = lines["HSD s=1"], lines["HSD s=1 (keep_first=1)"]
    assert list(paper.get_xdata()) == [17.2, 19.8] and list(variant.get_xdata()) == [21.4]
    assert paper.get_linestyle() == "-" and variant.get_linestyle() == "--"
    assert (paper.get_color(), paper.get_marker()) == build_policy("hsd", s=1).style
    assert variant.get_marker() == paper.get_marker()
    styles = [build_policy(name, **params).style for name, params in
              [("calm", {}), ("skipdecode", {}), ("hsd", {"s": 1}), ("hsd", {"s": 2})]]
    assert variant.get_color() in VARIANT_COLORS and variant.get_color() not in {color for color, _ in styles}


def test_one_line_per_setting_and_family(tmp_path):
    """Two checkpoints of one model: a line (and a Full star) per checkpoint, each named after it."""
    for grid in ("a", "b"):
        for i, (name, params, layers) in enumerate([("full", {}, 30.0), ("hsd", {"s": 1, "min": 0, "max": 18}, 19.8),
                                                    ("hsd", {"s": 1, "min": 0, "max": 8}, 17.2)]):
            write_run(tmp_path / grid / str(i), f"name: {name}", metrics_for(name, params, layers, 100.0, 1.0),
                      ckpt=f"/ckpt/{grid}.ckpt")
    runs = collect_runs([tmp_path / "a", tmp_path / "b"])
    ax = plot(build_table(runs), runs)
    lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()
             if not line.get_label().startswith("_")}
    assert lines == {"HSD s=1 [ckpt=/ckpt/a.ckpt]": [17.2, 19.8], "HSD s=1 [ckpt=/ckpt/b.ckpt]": [17.2, 19.8]}
    stars = {c.get_label() for c in ax.collections}
    assert stars == {"Full [ckpt=/ckpt/a.ckpt]", "Full [ckpt=/ckpt/b.ckpt]"}
