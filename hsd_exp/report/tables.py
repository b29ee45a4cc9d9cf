"""The comparison table: one row per run, Full-relative Speedup and % of full, as Markdown and CSV.

Rows follow the HSD paper's layout: one table per (model, dataset), Full first, then each policy family in
its ``Policy.order`` (CALM, SkipDecode, HSD), each by Avg. Layer descending. ``python -m hsd_exp.report``
(hsd_exp.report.__main__) is the command; its --help says what every column means.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from hsd_exp.errors import ConfigError
from hsd_exp.eval.metrics import QUALITY_KEYS
from hsd_exp.report.pairing import baselines as find_baselines
from hsd_exp.report.pairing import full_runs, shown, unpaired_notes
from hsd_exp.report.plots import plot_quality_vs_layers
from hsd_exp.report.runs import (
    SETTING_FIELDS,
    RunRecord,
    as_text,
    group_key,
    is_number,
    policy_name,
)
from hsd_exp.report.speedup import flags, length_ratio, speed_notes, speedup
from hsd_exp.run_folder import PAIRED, REPORT_FILES

__all__ = [
    "CSV_COLUMNS", "MD_COLUMNS", "PARAM_COLUMNS", "build_table", "check_not_mixed",
    "default_title", "group_notes", "markdown_table", "render_markdown", "retention_vs_full", "setting_names",
    "write_csv", "write_report",
]

# Markdown table: (header, row key). Status is text; everything else is a number with 2 decimals.
MD_COLUMNS = (
    ("Method", "method"), ("Avg. Layer", "avg_layers"), ("R-1", "rouge1"), ("R-2", "rouge2"),
    ("R-L", "rougeL"), ("BLEU-1", "bleu1"), ("BERTScore", "bertscore_f1"), ("tokens/s", "tokens_per_s"),
    ("ms/step", "ms_per_step"), ("Speedup", "speedup"), ("FLOP ideal", "flop_ideal"), ("% of full", "pct_full"),
    ("Flags", "flags"), ("Status", "status"),
)
PARAM_COLUMNS = ("s", "min", "max", "d", "criterion")  # the papers' parameters; a policy's others are in its row name
CSV_COLUMNS = (  # the setting: model, dataset and every field a Full baseline must share (run_folder.SETTING)
    "model", "dataset", "method", "plot_line", "policy", *PARAM_COLUMNS, "setting", *(f.name for f in PAIRED),
    "examples_hash", "avg_layers", "num_layers",
    *QUALITY_KEYS, "bertscore_model", "tokens_per_s", "ms_per_step", "prefill_ms", "speedup", "speedup_by",
    "flop_ideal", "mean_new_tokens", "length_ratio", "flags", "layer_forwards_per_token",
    "pct_full", *(f"{k}_pct_full" for k in QUALITY_KEYS), "num_examples", "num_predictions", "status", "path",
)


# -----------------------------------------------------------------------------
# Table


def check_not_mixed(runs: list[RunRecord]) -> None:
    """ConfigError if the runs span several datasets or models (a table must compare like with like)."""
    for what, attr in (("datasets", "dataset"), ("models", "model")):
        counts: dict[str, int] = {}
        for run in runs:
            value = as_text(getattr(run, attr)) or "?"
            counts[value] = counts.get(value, 0) + 1
        if len(counts) > 1:
            found = ", ".join(f"{k} ({n} runs)" for k, n in sorted(counts.items()))
            raise ConfigError(
                f"runs mix {what}: {found}; pass DIRs of one {attr} only, "
                f"or --allow-mixed for one table per (model, dataset)"
            )


def build_table(runs: list[RunRecord]) -> list[dict]:
    """Rows in display order (grouped by (model, dataset)); keys are the CSV columns (CSV_COLUMNS)."""
    rows = []
    for key in sorted({group_key(r) for r in runs}):
        group = [r for r in runs if group_key(r) == key]
        baselines = find_baselines(group)
        names = setting_names(group)
        with_full = {full.setting for full in full_runs(group)}
        # Settings that have a full run first, so the table still starts with "Full".
        group_rows = [_row(run, baselines.get(run.path), names)
                      for run in sorted(group, key=lambda r: (r.setting not in with_full, *_sort_key(r)))]
        rows += _distinct_methods(group_rows)
    return rows


def setting_names(group: list[RunRecord]) -> dict[tuple, str]:
    """{run.setting: "beams=1, ckpt=PATH"}: the SETTING_FIELDS whose values differ within ``group``, so a row
    names what sets it apart; all "" when the group holds one setting."""
    settings = sorted({r.setting for r in group})
    differ = [i for i in range(len(SETTING_FIELDS)) if len({s[i] for s in settings}) > 1]
    return {s: ", ".join(f"{SETTING_FIELDS[i][1]}={shown(s[i])}" for i in differ) for s in settings}


def _distinct_methods(rows: list[dict]) -> list[dict]:
    """Rows of one table that still share a method name (the same setting run twice, e.g. DIRs holding a
    rerun) are told apart by their run folder: a table never shows two rows that look the same."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["method"]] = counts.get(row["method"], 0) + 1
    for row in rows:
        if counts[row["method"]] > 1:
            path = Path(row["path"])
            row["method"] += f" ({path.parent.name}/{path.name})"
    return rows


def _sort_key(run: RunRecord) -> tuple:
    layers = run.avg_layers if is_number(run.avg_layers) else -math.inf
    return (run.setting, run.order, -layers, run.method, str(run.path))


def _row(run: RunRecord, full: RunRecord | None, setting_names: dict[tuple, str]) -> dict:
    setting = setting_names.get(run.setting, "")
    row = {
        "model": run.model, "dataset": run.dataset, "method": run.method, "plot_line": run.plot_line,
        "policy": policy_name(run.policy, run.policy_label), **{k: run.params.get(k) for k in PARAM_COLUMNS},
        "setting": setting, **{f.name: getattr(run, f.name) for f in PAIRED}, "examples_hash": run.examples_hash,
        "avg_layers": run.avg_layers, "num_layers": run.num_layers,
        **{k: getattr(run, k) for k in QUALITY_KEYS},
        "bertscore_model": run.bertscore_model, "tokens_per_s": run.tokens_per_s, "ms_per_step": run.ms_per_step,
        "prefill_ms": run.prefill_ms, "flop_ideal": run.flop_ideal, "mean_new_tokens": run.mean_new_tokens,
        "layer_forwards_per_token": run.layer_forwards_per_token,
    }
    row["speedup"], row["speedup_by"] = speedup(run, full)
    row["length_ratio"] = length_ratio(run, full)
    row["flags"] = "; ".join(flags(run, row["length_ratio"], row["speedup"])) or None
    retention = retention_vs_full(run, full) if full else {}
    kept = [v for v in retention.values() if v is not None]
    row["pct_full"] = sum(kept) / len(kept) if kept else None
    for k in QUALITY_KEYS:
        row[f"{k}_pct_full"] = retention.get(k)
    row.update(num_examples=run.num_examples, num_predictions=run.num_predictions, status=run.status,
               path=str(run.path))
    if setting:  # tell apart e.g. greedy and beam-4 runs, or two checkpoints, of the same policy
        row["method"] += f" [{setting}]"
    return {k: row[k] for k in CSV_COLUMNS}


def retention_vs_full(run: RunRecord, full: RunRecord) -> dict[str, float | None]:
    """{metric: metric / metric(full) * 100} (hsd_exp.eval.metrics.quality_retention); None where either is
    missing or full is 0, and for BERTScore when the backbones differ (such scores are not comparable)."""
    from hsd_exp.eval.metrics import quality_retention

    out = quality_retention({k: getattr(run, k) for k in QUALITY_KEYS}, {k: getattr(full, k) for k in QUALITY_KEYS})
    if run.bertscore_model != full.bertscore_model:
        out["bertscore_f1"] = None
    return out


# -----------------------------------------------------------------------------
# Markdown and CSV


def markdown_table(rows: list[dict]) -> str:
    header = [h for h, _ in MD_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    for row in rows:
        cells = [_md_cell(row[key], key) for _, key in MD_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _md_cell(value: Any, key: str) -> str:
    if value is None:
        return ""
    if is_number(value) and key not in ("method", "status"):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def group_notes(rows: list[dict], runs: list[RunRecord]) -> list[str]:
    """Lines under a group's table: BERTScore backbone(s), missing baselines (for each row without one: what
    differs from the nearest Full run), partial runs."""
    notes = []
    backbones: dict[str, list[str]] = {}
    for row in rows:
        if row["bertscore_f1"] is not None:
            backbones.setdefault(as_text(row["bertscore_model"]) or "unknown", []).append(row["method"])
    if len(backbones) == 1:
        notes.append(f"BERTScore backbone: `{next(iter(backbones))}` (scores from different backbones are "
                     f"not comparable).")
    elif len(backbones) > 1:
        used = "; ".join(f"`{b}`: {', '.join(m)}" for b, m in sorted(backbones.items()))
        notes.append(f"**WARNING: these runs used DIFFERENT BERTScore backbones ({used}). Their BERTScore "
                     f"values are NOT comparable; BERTScore is left out of % of full where the backbone "
                     f"differs from the full run's.**")
    else:
        notes.append("BERTScore: not computed by these runs.")
    baselines = find_baselines(runs)
    if not full_runs(runs):
        notes.append("No full-decoding run for these settings: Speedup and % of full are blank.")
    notes.extend(unpaired_notes(runs, rows, baselines))
    notes.extend(lossless_notes(runs, baselines))
    used = list({full.path: full for full in baselines.values()}.values())
    no_speed = [f"`{full.path}`" for full in used if not (is_number(full.ms_per_step) or is_number(full.tokens_per_s))]
    if no_speed:
        notes.append(f"Full run(s) without timing (scored on resume) give % of full but no Speedup: "
                     f"{', '.join(no_speed)}")
    # paired, timed in some way, yet no Speedup: a run (or its Full run) from before ms_per_step was recorded
    by_path = {str(run.path): run for run in runs}
    untimed = [row["method"] for row in rows if row["speedup"] is None and row["status"] == "complete"
               and (full := baselines.get(by_path[row["path"]].path)) is not None
               and f"`{full.path}`" not in no_speed]
    notes.extend(speed_notes(rows, untimed))
    notes.extend(_example_count_notes(runs))
    partial = [row for row in rows if row["status"] != "complete"]
    if partial:
        notes.append(f"{len(partial)} run(s) not complete (see Status); partial runs are not plotted: "
                     + ", ".join(f"`{row['path']}`" for row in partial))
    return notes


def lossless_notes(runs: list[RunRecord], baselines: dict) -> list[str]:
    """A lossless run promises its Full run's output: check it, prediction by prediction."""
    from hsd_exp.eval.predictions import read_run_predictions

    notes = []
    for run in runs:
        full = baselines.get(run.path)
        if not run.lossless or full is None:
            continue
        ours = {str(r["id"]): r["prediction"] for r in read_run_predictions(run.path)}
        theirs = {str(r["id"]): r["prediction"] for r in read_run_predictions(full.path)}
        shared = set(ours) & set(theirs)
        differ = sorted(i for i in shared if ours[i] != theirs[i])
        if differ:
            notes.append(f"**WARNING: {run.method} is not lossless here: {len(differ)} of {len(shared)} "
                         f"predictions differ from its Full run's (`{full.path}`), e.g. id {differ[0]}.**")
        else:
            notes.append(f"{run.method}: all {len(shared)} predictions identical to its Full run's, as promised.")
        if is_number(run.layer_forwards_per_token):  # Avg. Layer is L (the depth that decided each token)
            notes.append(f"{run.method}: Avg. Layer is the depth that decided each committed token (the verify "
                         f"forward's, {as_text(run.num_layers) or 'L'}); its drafts and verifications ran "
                         f"{run.layer_forwards_per_token:.2f} decoder-layer forwards per token "
                         f"(report.csv layer_forwards_per_token).")
    return notes


def _example_count_notes(runs: list[RunRecord]) -> list[str]:
    counts = {r.num_examples for r in runs if r.complete and r.num_examples is not None}
    if len(counts) > 1:
        return [f"Complete runs scored different numbers of examples ({', '.join(map(str, sorted(counts)))}): "
                f"their metrics are not directly comparable."]
    return []


def render_markdown(runs: list[RunRecord], rows: list[dict], title: str, png_name: str | None) -> str:
    parts = [f"# {title}", ""]
    for key in sorted({group_key(r) for r in runs}):
        group_rows = [row for row in rows if (as_text(row["model"]) or "?", as_text(row["dataset"]) or "?") == key]
        group_runs = [r for r in runs if group_key(r) == key]
        parts += [f"## {key[0]} / {key[1]}", "", markdown_table(group_rows), ""]
        parts += [f"- {note}" for note in group_notes(group_rows, group_runs)] + [""]
    parts += [
        "Speedup = ms/step(full) / ms/step(run), one decode step of the batch with the prefill timed apart (lossless "
        "rows: tokens/s / tokens/s(full)); FLOP ideal = the speedup the FLOPs of the layers run allow; % of full = mean over R-1, R-2, R-L, BLEU-1, BERTScore of "
        "metric / metric(full) * 100 (per-metric values in report.csv). Full = the full-decoding run of the "
        "same model, dataset and setting (model.path, model.adapter, ckpt_path, split, limit, num_beams, do_sample, "
        "max_new_tokens, dataset.path, model.chat, instruction, separator, max_source_tokens; temperature and "
        "top_p when sampling) that scored the same examples. Avg. Layer = mean decoder layers run per "
        "generated token.",
        "",
    ]
    if png_name:
        parts += [f"![quality vs. layers]({png_name})", ""]
    return "\n".join(parts)


def write_csv(rows: list[dict], path: Path) -> None:
    """Full precision: Python writes floats with repr, which reads back to the identical value."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


# -----------------------------------------------------------------------------
# Outputs


def write_report(runs: list[RunRecord], out_dir: str | os.PathLike, metric: str = "rougeL", *,
                 title: str | None = None, allow_mixed: bool = True) -> dict[str, Path]:
    """Write report.md, report.csv and quality_vs_layers.png into ``out_dir``; returns {"md", "csv", "png"}.

    ``allow_mixed=False`` raises ConfigError when the runs span several models or datasets.
    """
    if not runs:
        raise ConfigError("no runs to report on: collect_runs(dirs) found none")
    if metric not in QUALITY_KEYS:
        raise ConfigError(f"metric={metric} is unknown; choose one of {', '.join(QUALITY_KEYS)}")
    if not allow_mixed:
        check_not_mixed(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / name for k, name in REPORT_FILES.items()}
    rows = build_table(runs)
    write_csv(rows, paths["csv"])
    title = title or default_title(runs)
    plot_quality_vs_layers(runs, rows, paths["png"], metric=metric, title=title)  # panels name model/dataset
    paths["md"].write_text(render_markdown(runs, rows, title, REPORT_FILES["png"]), encoding="utf-8")
    return paths


def default_title(runs: list[RunRecord]) -> str:
    """What was run: model and dataset, and the adapter, split and n (examples scored) when every run shares
    them ("Layer-skipping decoding: smollm2-135m + adapter smollm2_e2e_robust on e2e test, n=16")."""
    keys = sorted({group_key(r) for r in runs})
    shared = {name: values.pop() if len(values := {as_text(getattr(r, name)) for r in runs}) == 1 else ""
              for name in ("adapter", "split", "num_examples")}
    model = f"{keys[0][0]} + adapter {shared['adapter']}" if shared["adapter"] else keys[0][0]
    data = " ".join(x for x in (keys[0][1], shared["split"]) if x)
    n = f", n={shared['num_examples']}" if shared["num_examples"] else ""
    if len(keys) == 1:
        return f"Layer-skipping decoding: {model} on {data}{n}"
    split = f" ({shared['split']} split)" if shared["split"] else ""
    return f"Layer-skipping decoding comparison{split}{n}"
