"""The paper's Fig. 1: quality vs. Avg. Layer, one line per method (its plot line) (and setting), one panel per (model,
dataset). Each run's policy gives its line (``Policy.plot_line``), order, colour and marker (``Policy.style``);
the baseline (Full) is a star, a variant (options beyond the paper's) a dashed line in a colour of its own."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from hsd_exp.report.runs import RunRecord, as_text, group_key, is_number

METRIC_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu1": "BLEU-1",
                "bertscore_f1": "BERTScore F1"}

VARIANT_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")  # no policy's style
SETTING_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                  "tab:olive", "tab:cyan", "tab:gray")  # one per model setting when a panel holds several


def plot_quality_vs_layers(runs: list[RunRecord], rows: list[dict], path: Path, metric: str = "rougeL",
                           title: str | None = None) -> Path:
    """One panel per (model, dataset): x = Avg. Layer, y = ``metric``; a line per plot line (Policy.plot_line), Full as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({group_key(r) for r in runs})
    fig = Figure(figsize=(9.6 * len(keys), 4.8), layout="constrained")  # room for the legend beside the axes
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        group = [row for row in rows if (as_text(row["model"]) or "?", as_text(row["dataset"]) or "?") == key]
        _plot_group(ax, group, metric, runs)
        ax.set_title(f"{key[0]} on {key[1]}")
        ax.set_xlabel("Avg. Layer (decoder layers per generated token)")
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return path


def _plot_group(ax: Any, rows: list[dict], metric: str, runs: list[RunRecord]) -> None:
    """One panel. With one setting, each policy family has its colour (``Policy.style``) and Full is a black star;
    with several (three models, two checkpoints), each setting has a colour of its own and the policy keeps its
    marker, so three Full stars stay three. The legend sits outside the axes, where it hides no point."""
    points = [r for r in rows if r["status"] == "complete" and is_number(r["avg_layers"]) and is_number(r[metric])]
    if not points:
        ax.text(0.5, 0.5, "no complete runs with this metric", ha="center", va="center", transform=ax.transAxes)
        return
    by_path = {str(run.path): run for run in runs}
    variant_colors = itertools.cycle(VARIANT_COLORS)
    settings = sorted({row["setting"] or "" for row in points})
    setting_color = dict(zip(settings, itertools.cycle(SETTING_COLORS), strict=False)) if len(settings) > 1 else {}
    lines: dict[tuple, list[dict]] = {}
    for row in points:
        # one line per (setting, plot line): runs of two checkpoints or decode settings never share a line
        key = (by_path[row["path"]].order, row["plot_line"], row["setting"] or "")
        lines.setdefault(key, []).append(row)
    for (_, _, setting), members in sorted(lines.items(), key=lambda item: (item[0][2], item[0][:2])):
        members.sort(key=lambda r: r["avg_layers"])
        xs, ys = [r["avg_layers"] for r in members], [r[metric] for r in members]
        line_runs = [by_path[r["path"]] for r in members]
        label = line_label(line_runs) + (f" [{setting}]" if setting else "")  # "" when the panel holds one setting
        run = line_runs[0]  # one plot line: one policy class, one style
        if run.is_baseline:  # the reference: a star and a horizontal line at its quality
            color = setting_color.get(setting, "black")
            ax.axhline(ys[0], color=color, linestyle="--", linewidth=0.8, alpha=0.6)
            ax.scatter(xs, ys, marker="*", s=220, color=color, edgecolors="black", zorder=3, label=label)
            continue
        color, marker = run.built.style if run.built else (None, "o")
        linestyle = "-"
        if run.built and run.built.variant:  # its line's marker, a colour of its own, dashed
            color, linestyle = next(variant_colors), "--"
        color = setting_color.get(setting, color)
        ax.plot(xs, ys, marker=marker, color=color, linestyle=linestyle, label=label)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")


def line_label(line_runs: list[RunRecord]) -> str:
    """A line's legend label with every run's full parameters, in the line's order: "SkipDecode (11,11,
    keep_first=6)" for one run, "HSD (s=1, 0, 8), (s=1, 0, 18)" for runs of one family (its title said once)."""
    names = [run.method for run in line_runs]
    title = line_runs[0].built.title if line_runs[0].built else None
    if title and len(names) > 1 and not any(run.lossless for run in line_runs) \
            and all(name.startswith(f"{title} (") for name in names):
        return title + " " + ", ".join(name[len(title) + 1:] for name in names)
    return "; ".join(names)
