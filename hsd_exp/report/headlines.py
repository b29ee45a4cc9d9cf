"""The headline tables of README.md and docs/results.md, written from the result files they quote.

``python -m hsd_exp.report.headlines`` rewrites, in each page of ``PAGES``, the text between
``<!-- headlines:NAME begin -->`` and ``<!-- headlines:NAME end -->`` with table NAME of ``TABLES``;
``--check`` writes nothing and exits 1 with a diff when a committed table differs from what its files say
(``tests/report/test_headlines.py`` runs it, so a table edited by hand fails the tests).

Every number comes from a ``docs/results/<dir>/report.csv`` (``python -m hsd_exp.report``'s CSV, see
``hsd_exp.report.tables.CSV_COLUMNS``): a run is picked by its ``method`` exactly as the report wrote it.
Retention against the run's own full depth is the CSV's own (``pct_full`` = mean over m in {R-1, R-2, R-L,
BLEU-1, BERTScore} of m / m(Full) x 100, and ``rougeL_pct_full``); retention against the plain fine-tune's full
depth, m / m(Full_plain) x 100, is computed here with the same formula (``eval.metrics.quality_retention``),
only for runs the plain full row can be compared with (same model, data, split, limit, decoding, BERTScore
backbone, and examples where both CSVs name them), else a ConfigError. A row whose ``policy`` is given names
its layers from that policy's own ``layers()`` (1-indexed, "1-6 + 19-30"), and its recorded Avg. Layer must
equal their count (a constant schedule), so a label cannot drift from the run. A row marked ``best_at_most=n``
must be the best % of full among its model's rows at <= n layers in ``among``. Speed rows are not generated
yet: they stay prose with their file link until the bench writes a ``bench.csv``.

The rows are declared in ``hsd_exp/report/headline_rows.py``. To add a row (e.g. the shipped fp16 adapter's rerun
in a new folder ``docs/results/e2e_robust_fp16/``): append one ``Line`` to the table's list in ``TABLES``,
``Line("what it is", "budget", Pick("e2e_robust_fp16", "<method in its report.csv>"),
Pick("e2e_robust_fp16", "<its Full row's method>"), plain_full=Pick(...) or None, policy=HEADLINE)``, and run
``python -m hsd_exp.report.headlines``. A new table: an entry in ``TABLES``, its columns in ``COLUMNS`` (keys of
``HEADERS``; a ``Grid`` needs none), its name under its page in ``PAGES``, and the marker pair in that page.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import re
from pathlib import Path

from hsd_exp.errors import ConfigError, exit_on_config_error
from hsd_exp.eval.metrics import QUALITY_KEYS, quality_retention
from hsd_exp.report.headline_rows import COLUMNS, PAGES, TABLES, Bench, Grid, Line, Pick

__all__ = ["COLUMNS", "PAGES", "TABLES", "Grid", "Line", "Pick", "layer_label", "main", "render", "retention",
           "update"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout: README.md, docs/
COMPARABLE = ("model", "dataset", "split", "limit", "max_new_tokens", "num_beams", "do_sample", "bertscore_model")


HEADERS = {
    "what": "result", "budget": "budget", "setting": "setting", "avg": "Avg. Layer", "rouge1": "R-1", "rouge2": "R-2",
    "rougeL": "R-L", "bleu1": "BLEU-1", "bertscore_f1": "BERTScore", "own_rl": "R-L % of own full",
    "own5": "% of own full", "own": "% of own full", "plain": "% of the plain fine-tune's full",
    "own_full_rl": "own full R-L", "from": "from",
}
RIGHT = {"avg", "rouge1", "rouge2", "rougeL", "bleu1", "bertscore_f1", "own_rl", "own5", "own", "plain", "own_full_rl"}


# -----------------------------------------------------------------------------
# Reading the result files


class Results:
    """report.csv rows of ``<root>/docs/results/<dir>/``, read once each; ``row(pick)`` or a ConfigError."""

    def __init__(self, root: Path):
        self.root, self._rows = Path(root), {}

    def rows(self, result: str) -> list[dict]:
        if result not in self._rows:
            path = self.root / "docs" / "results" / result / "report.csv"
            if not path.is_file():
                raise ConfigError(f"headline table reads {path}, which does not exist: run python -m hsd_exp.report "
                                  f"... --out docs/results/{result}, or drop the row from hsd_exp/report/headlines.py")
            with path.open(newline="") as f:
                self._rows[result] = list(csv.DictReader(f))
        return self._rows[result]

    def row(self, pick: Pick) -> dict:
        found = [r for r in self.rows(pick.result) if r["method"] == pick.method]
        if len(found) != 1:
            raise ConfigError(f"docs/results/{pick.result}/report.csv has {len(found)} rows with method "
                              f"{pick.method!r} (one expected): fix the Pick in hsd_exp/report/headlines.py")
        return found[0]


def _num(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if value not in (None, "") else None


def retention(run: dict, full: dict) -> tuple[float | None, float | None]:
    """(mean % of full over the five metrics, R-L % of full) of ``run`` against ``full``."""
    kept = quality_retention({k: _num(run, k) for k in QUALITY_KEYS}, {k: _num(full, k) for k in QUALITY_KEYS})
    values = [v for v in kept.values() if v is not None]
    return (sum(values) / len(values) if values else None), kept["rougeL"]


def check_comparable(run: dict, full: dict, what: str) -> None:
    """ConfigError unless ``run`` and ``full`` scored the same examples the same way (``COMPARABLE`` fields)."""
    fields = COMPARABLE + (("examples_hash",) if run.get("examples_hash") and full.get("examples_hash") else ())
    differ = [f"{k}: {run.get(k)!r} vs {full.get(k)!r}" for k in fields if run.get(k) != full.get(k)]
    if differ:
        raise ConfigError(f"{what} cannot be measured against {full['method']!r}: {'; '.join(differ)}; "
                          f"pick a full row of the same setting in hsd_exp/report/headlines.py")


def layer_label(policy: tuple, num_layers: int) -> tuple[str, int]:
    """(1-indexed layers of a constant static schedule as ranges, "1-6 + 19-30"; how many); ConfigError if the
    schedule varies with the token."""
    from hsd_exp import build_policy

    built = build_policy(policy[0], **policy[1])
    sets = {built.layers(t, 48, num_layers) for t in range(48)}
    if len(sets) != 1:
        raise ConfigError(f"{built.label} runs different layers at different tokens: give only constant schedules "
                          f"a policy in hsd_exp/report/headlines.py")
    ranges, layers = [], [i + 1 for i in next(iter(sets))]
    for i in layers:
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return " + ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges), len(layers)


# -----------------------------------------------------------------------------
# Rows and tables


def line_values(line: Line, results: Results) -> dict:
    """What a Line prints, every number read from (or computed on) its rows, with the checks of the docstring."""
    run, own = results.row(line.run), results.row(line.own_full)
    check_comparable(run, own, line.run.method)
    own5, own_rl = _num(run, "pct_full"), _num(run, "rougeL_pct_full")
    mine5, mine_rl = retention(run, own)
    if own5 is None or abs(own5 - mine5) > 0.01 or abs(own_rl - mine_rl) > 0.01:
        raise ConfigError(f"{line.run.method!r} in docs/results/{line.run.result} was not measured against "
                          f"{line.own_full.method!r} (its pct_full is {own5}): fix own_full in hsd_exp/report/headlines.py")
    method, avg = re.sub(r" \[adapter=[^\]]*\]$", "", run["method"]), _num(run, "avg_layers")
    setting = method
    if line.policy:
        label, count = layer_label(line.policy, int(run["num_layers"]))
        if abs(avg - count) > 1e-6:
            raise ConfigError(f"{method!r} ran {avg} layers per token, its policy {line.policy} runs {count}: "
                              f"fix the policy in hsd_exp/report/headlines.py")
        setting = f"layers {label}, {method}"
    if line.best_at_most is not None:
        _check_best(line, run, own, results)
        setting = f"best at <= {line.best_at_most:g} layers: {setting}"
    plain = None
    if line.plain_full and line.plain_full != line.own_full:  # the run is not the plain fine-tune itself
        full = results.row(line.plain_full)
        check_comparable(run, full, line.run.method)
        plain = retention(run, full)
    return {"what": line.what, "budget": line.budget, "setting": setting, "avg": f"{avg:.2f}",
            **{k: f"{_num(run, k):.2f}" for k in QUALITY_KEYS}, "own_rl": f"{own_rl:.1f}", "own5": f"{own5:.1f}",
            "own": f"{own5:.1f}% (R-L {own_rl:.1f}%)", "own_full_rl": f"{_num(own, 'rougeL'):.2f}",
            "plain": f"{plain[0]:.1f}% (R-L {plain[1]:.1f}%)" if plain else "= own",
            "from": line.run.result}


def _check_best(line: Line, run: dict, own: dict, results: Results) -> None:
    """ConfigError unless ``run`` has the best % of full among the rows at <= best_at_most layers that share
    its own full row (same checkpoint) in the folders ``line.among``."""
    rivals = [r for d in line.among or (line.run.result,) for r in results.rows(d)
              if r["method"] != own["method"] and r.get("ckpt_path") == own.get("ckpt_path")
              and r.get("adapter") == own.get("adapter") and _num(r, "avg_layers") is not None
              and _num(r, "avg_layers") <= line.best_at_most and _num(r, "pct_full") is not None]
    best = max(rivals, key=lambda r: _num(r, "pct_full"))
    if _num(best, "pct_full") > _num(run, "pct_full") + 1e-9:
        raise ConfigError(f"{line.run.method!r} is not the best row at <= {line.best_at_most:g} layers: "
                          f"{best['method']!r} keeps {_num(best, 'pct_full'):.2f}%; fix the row in hsd_exp/report/headlines.py")


def render_lines(name: str, lines: list[Line], results: Results, page: str) -> str:
    columns = COLUMNS[name]
    out = ["| " + " | ".join(HEADERS[c] for c in columns) + " |",
           "|" + "|".join("---:" if c in RIGHT else "---" for c in columns) + "|"]
    for line in lines:
        values = line_values(line, results)
        link = Path("docs/results") / values["from"] / "report.md"
        values["from"] = f"[{values['from']}]({Path(_relative(link, page))})"
        out.append("| " + " | ".join(values[c] for c in columns) + " |")
    return "\n".join(out)


def _relative(target: Path, page: str) -> str:
    depth = len(Path(page).parent.parts)
    return str(Path(*([".."] * depth), target)) if depth else str(target)


def render_grid(grid: Grid, results: Results) -> str:
    out = ["| Method | " + " | ".join(h for h, _ in grid.columns) + " |", "|---|" + "---:|" * len(grid.columns)]
    for label, cells in grid.rows:
        shown = []
        for header, result in grid.columns:
            cell = cells.get(header)
            if cell is None:
                shown.append("")
                continue
            row = results.row(cell if isinstance(cell, Pick) else Pick(result, cell))
            shown.append(f"{_num(row, 'avg_layers'):.1f} / {_num(row, 'pct_full'):.0f}% / "
                         f"{_num(row, 'rougeL_pct_full'):.0f}%")
        out.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(out)


def render_bench(bench: Bench, root: Path) -> str:
    """The rows of a bench.csv that match ``bench.where``, as written (numbers to 3 places, as bench.md)."""
    path = root / "docs" / "results" / bench.result / "bench.csv"
    if not path.is_file():
        raise ConfigError(f"headline table reads {path}, which does not exist: run python -m hsd_exp.bench and copy "
                          f"its bench.csv to docs/results/{bench.result}/, or drop the table from headline_rows.py")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if all(r.get(k) == v for k, v in bench.where)]
    if not rows:
        raise ConfigError(f"{path} has no row with {dict(bench.where)}: fix the Bench in headline_rows.py")

    def cell(value: str) -> str:
        try:
            return value if value.isdigit() else f"{float(value):.3f}"
        except ValueError:
            return value

    out = ["| " + " | ".join(h for h, _ in bench.columns) + " |", "|" + "---|" * len(bench.columns)]
    out += ["| " + " | ".join(cell(r.get(c, "")) for _, c in bench.columns) + " |" for r in rows]
    out.append(f"\n(`docs/results/{bench.result}/bench.csv`)")
    return "\n".join(out)


def render(name: str, results: Results, page: str) -> str:
    table = TABLES[name]
    if isinstance(table, Bench):
        return render_bench(table, results.root)
    return render_grid(table, results) if isinstance(table, Grid) else render_lines(name, table, results, page)


# -----------------------------------------------------------------------------
# Pages


def marker(name: str, end: bool = False) -> str:
    return f"<!-- headlines:{name} {'end' if end else 'begin'} -->"


def rewrite(text: str, page: str, names: tuple[str, ...], results: Results) -> str:
    """``text`` with each table NAME between its markers replaced by what the files say."""
    for name in names:
        begin, end = marker(name), marker(name, end=True)
        if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
            raise ConfigError(f"{page} needs one '{begin}' ... '{end}' pair: add it where table {name} goes")
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{render(name, results, page)}\n{end}{tail}"
    return text


def update(root: Path = ROOT, check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, compare) every page of ``PAGES`` under ``root``; the unified diff lines of
    the pages whose committed tables differ from their files (empty: all agree)."""
    results, diff, changed = Results(root), [], {}
    for page, names in PAGES.items():  # every page rendered before any is written: a bad spec writes nothing
        path = Path(root) / page
        old = path.read_text()
        new = rewrite(old, page, names, results)
        if new != old:
            diff += difflib.unified_diff(old.splitlines(), new.splitlines(), f"{page} (committed)",
                                         f"{page} (from the result files)", lineterm="")
            changed[path] = new
    if not check:
        for path, new in changed.items():
            path.write_text(new)
    return diff


def main(argv: list[str] | None = None) -> int:
    """``python -m hsd_exp.report.headlines [--check]``: 0 when the pages agree (or were rewritten), 1 with the
    diff when ``--check`` finds a table that differs, 2 for a bad spec or a missing file."""
    p = argparse.ArgumentParser(prog="python -m hsd_exp.report.headlines", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff if a page differs")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout holding README.md and docs/ (default: this one)")
    args = p.parse_args(argv)
    try:
        with exit_on_config_error():
            diff = update(args.root, check=args.check)
    except SystemExit as e:
        return int(e.code or 0)
    if diff:
        print("\n".join(diff))
        if args.check:
            print("headline tables differ from their result files: run python -m hsd_exp.report.headlines")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
