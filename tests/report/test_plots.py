"""hsd_exp.report.plots: one line per method family, variants (options beyond the paper's) on lines of their own;
a new policy gets its row and its line with no change to the report."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from hsd_exp.errors import ConfigError
from hsd_exp.report.plots import VARIANT_COLORS, _plot_group
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import build_table, default_title, write_report
from hsd_exp.skip.policies import POLICIES, Policy, build_policy

from helpers import make_multirun, metrics_for, policy_yaml, set_config, write_run


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
    # every run's parameters in its line's label; Full: a star and an unlabelled axhline
    assert set(lines) == {"HSD (s=1, 0, 8), (s=1, 0, 18)", "HSD (s=1, 0, 18, keep_first=1)"}
    paper, variant = lines["HSD (s=1, 0, 8), (s=1, 0, 18)"], lines["HSD (s=1, 0, 18, keep_first=1)"]
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
    assert lines == {"HSD (s=1, 0, 8), (s=1, 0, 18) [ckpt=/ckpt/a.ckpt]": [17.2, 19.8],
                     "HSD (s=1, 0, 8), (s=1, 0, 18) [ckpt=/ckpt/b.ckpt]": [17.2, 19.8]}
    stars = {c.get_label() for c in ax.collections}
    assert stars == {"Full [ckpt=/ckpt/a.ckpt]", "Full [ckpt=/ckpt/b.ckpt]"}
    # a colour per setting (the policy keeps its marker), so the two Full stars are two
    colors = {line.get_label(): line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert len(set(colors.values())) == 2
    assert len({tuple(c.get_facecolor()[0]) for c in ax.collections}) == 2


# ----------------------------------------------------------------------------- a new policy
# Adding a static policy is one class (plus its conf/policy/*.yaml): with no other change the config builds it,
# the report names its row and sorts it, and the figure draws its line.
@contextmanager
def every_kth_policy():
    """A toy static policy, registered while the block runs (and unregistered after: no leak into other tests)."""

    @dataclass(frozen=True)
    class EveryKth(Policy):
        """Every k-th layer counted down from the top, for every token: run { i : (L - i) mod k = 0 }.
        The same set at every T, so trivially monotone."""

        k: int = 2
        name = "every_kth"
        title = "Every k-th"

        def validate(self, num_layers: int | None = None) -> None:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
                raise ConfigError(f"policy.k={self.k} is out of range: must be an integer >= 1")

        def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
            return tuple(i for i in range(num_layers) if (num_layers - 1 - i) % self.k == 0)

    try:
        yield EveryKth
    finally:
        POLICIES.pop(EveryKth.name, None)


def test_a_new_static_policy_gets_its_row_and_line_with_no_other_change(tmp_path: Path):
    from hydra.utils import instantiate

    with every_kth_policy():
        # conf/policy/every_kth.yaml would hold: {_target_: hsd_exp.build_policy, name: every_kth, k: 2}
        policy = instantiate({"_target_": "hsd_exp.build_policy", "name": "every_kth", "k": 3})
        assert policy.layers(0, 10, 6) == (2, 5) and policy.label == "every_kth(k=3)"

        root = make_multirun(tmp_path / "m", partial=False)
        for k, layers in ((2, 15.0), (3, 10.0)):
            write_run(root / f"9_every_{k}", policy_yaml("every_kth", {"k": k}),
                      metrics_for("every_kth", {"k": k}, layers, 250.0, 0.6))
        runs = collect_runs([root])
        rows = build_table(runs)
        assert [r["method"] for r in rows] == ["Full", "CALM (d=0.02)", "SkipDecode (10,20)", "HSD (s=1, 0, 18)",
                                               "HSD (s=2, 0, 12)", "Every k-th (k=2)", "Every k-th (k=3)"]
        new = rows[-1]
        assert (new["plot_line"], new["policy"], new["speedup"]) == ("Every k-th", "every_kth", 2.5)
        assert new["pct_full"] == pytest.approx(60.0)

        ax = Figure().subplots()
        _plot_group(ax, rows, "rougeL", runs)
        lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        assert lines["Every k-th (k=3), (k=2)"] == [10.0, 15.0]

        paths = write_report(runs, tmp_path / "out")
        assert "| Every k-th (k=3) | 10.00 |" in paths["md"].read_text()

    assert "every_kth" not in POLICIES  # unregistered: nothing leaks into other tests
    with pytest.raises(ConfigError, match="policy.name=every_kth is unknown"):
        build_policy("every_kth")


# ----------------------------------------------------------------------------- titles and legends name what ran
def three_models(root: Path) -> list:
    """`make demo`'s report: Full and one policy for each of three model settings (the released model and two
    adapters), every run on the same 16 test examples."""
    for adapter in (None, "smollm2_e2e_robust", "smollm2_e2e_skiplayer"):
        for name, params, layers in (("full", {}, 30.0), ("skipdecode", {"min": 11, "max": 11, "keep_first": 6}, 17.0)):
            folder = root / (adapter or "released") / name
            write_run(folder, policy_yaml(name, params), {**metrics_for(name, params, layers, 100.0, 1.0),
                                                          "num_examples": 16})
            set_config(folder, model__adapter=adapter, dataset__split="test")
    return collect_runs([root])


def test_three_models_get_three_colours_and_the_legend_sits_outside(tmp_path):
    runs = three_models(tmp_path / "demo")
    ax = plot(build_table(runs), runs)
    stars = {c.get_label(): tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(stars) == 3 and len(set(stars.values())) == 3  # three Full stars, three colours
    assert all(label.startswith("Full [adapter=") for label in stars)
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert all(label.startswith("SkipDecode (11,11, keep_first=6) [adapter=") for label in labels), labels
    assert len({line.get_marker() for line in ax.get_lines() if not line.get_label().startswith("_")}) == 1
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 > 1.0  # right of the axes: it covers no point


def test_default_title_names_adapter_split_and_n_when_shared(tmp_path):
    runs = three_models(tmp_path / "demo")
    assert default_title(runs) == "Layer-skipping decoding: smollm2-135m on e2e test, n=16"  # adapters differ
    robust = [r for r in runs if r.adapter == "smollm2_e2e_robust"]
    assert default_title(robust) == "Layer-skipping decoding: smollm2-135m + adapter smollm2_e2e_robust on e2e test, n=16"
    paths = write_report(robust, tmp_path / "out")
    assert paths["md"].read_text().startswith(f"# {default_title(robust)}\n")
