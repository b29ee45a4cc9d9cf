"""The paper's Fig. 1: quality vs. Avg. Layer, one line per method family (and setting), one panel per (model,
dataset)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from hsd_exp.report.runs import FAMILY_ORDER, RunRecord, as_text, group_key, is_number

METRIC_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu1": "BLEU-1",
                "bertscore_f1": "BERTScore F1"}

FAMILY_STYLE = {"HSD s=1": ("tab:red", "o"), "HSD s=2": ("tab:orange", "s"), "SkipDecode": ("tab:blue", "^"),
                "CALM": ("tab:green", "D")}
VARIANT_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")  # not in FAMILY_STYLE


def plot_quality_vs_layers(runs: list[RunRecord], rows: list[dict], path: Path, metric: str = "rougeL",
                           title: str | None = None) -> Path:
    """One panel per (model, dataset): x = Avg. Layer, y = ``metric``; a line per family, Full as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({group_key(r) for r in runs})
    fig = Figure(figsize=(6.4 * len(keys), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        group = [row for row in rows if (as_text(row["model"]) or "?", as_text(row["dataset"]) or "?") == key]
        _plot_group(ax, group, metric)
        ax.set_title(f"{key[0]} on {key[1]}")
        ax.set_xlabel("Avg. Layer (decoder layers per generated token)")
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return path


def _plot_group(ax: Any, rows: list[dict], metric: str) -> None:
    points = [r for r in rows if r["status"] == "complete" and is_number(r["avg_layers"]) and is_number(r[metric])]
    if not points:
        ax.text(0.5, 0.5, "no complete runs with this metric", ha="center", va="center", transform=ax.transAxes)
        return
    variant_colors = itertools.cycle(VARIANT_COLORS)
    lines: dict[tuple, list[dict]] = {}
    for row in points:
        # one line per (setting, family): runs of two checkpoints or decode settings never share a line
        key = (FAMILY_ORDER.get(row["policy"], len(FAMILY_ORDER)), row["family"], row["setting"] or "")
        lines.setdefault(key, []).append(row)
    for (_, family, setting), members in sorted(lines.items()):
        members.sort(key=lambda r: r["avg_layers"])
        xs, ys = [r["avg_layers"] for r in members], [r[metric] for r in members]
        label = f"{family} [{setting}]" if setting else family  # "" when the panel holds one setting
        if family == "Full":  # the reference: a star and a horizontal line at its quality
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=0.8, alpha=0.6)
            ax.scatter(xs, ys, marker="*", s=220, color="black", zorder=3, label=label)
            continue
        base = family.split(" (")[0]  # a variant ("HSD s=1 (keep_first=1)"): its family's marker, own colour, dashed
        color, marker = FAMILY_STYLE.get(base, (None, "o"))
        style = "-"
        if base != family:
            color, style = next(variant_colors), "--"
        ax.plot(xs, ys, marker=marker, color=color, linestyle=style, label=label)
    ax.legend(loc="best", fontsize="small")
