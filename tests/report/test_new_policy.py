"""Adding a static policy is one class (plus its conf/policy/*.yaml): with no other change the config builds
it, the report names its row and sorts it, and the figure draws its line."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from hsd_exp.errors import ConfigError
from hsd_exp.report.plots import _plot_group
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import build_table, write_report
from hsd_exp.skip.policies import POLICIES, Policy, build_policy

from helpers import make_multirun, metrics_for, policy_yaml, write_run


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
        assert (new["family"], new["policy"], new["speedup"]) == ("Every k-th", "every_kth", 2.5)
        assert new["pct_full"] == pytest.approx(60.0)

        ax = Figure().subplots()
        _plot_group(ax, rows, "rougeL", runs)
        lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        assert lines["Every k-th"] == [10.0, 15.0]

        paths = write_report(runs, tmp_path / "out")
        assert "| Every k-th (k=3) | 10.00 |" in paths["md"].read_text()

    assert "every_kth" not in POLICIES  # unregistered: nothing leaks into other tests
    with pytest.raises(ConfigError, match="policy.name=every_kth is unknown"):
        build_policy("every_kth")
