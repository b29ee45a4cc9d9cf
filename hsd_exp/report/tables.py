"""Comparison report over evaluation runs: ``python -m hsd_exp.report DIR [DIR ...]``.

Each DIR is a Hydra multirun dir or a single run dir. Every run folder below DIR (.hydra/config.yaml,
metrics.json, predictions*.jsonl; task=compare subfolders included) is one row (see hsd_exp.report.runs and
DEVELOPERS.md "Run directory format"). The table follows the HSD paper's layout: one row per decoding
setting, one table per (model, dataset).

Outputs (into --out, default the first DIR):
  report.md              the tables (numbers rounded to 2 decimals) with notes, and the figure
  report.csv             every row at full precision, plus each metric's retention <m>_pct_full
  quality_vs_layers.png  the paper's Fig. 1: quality (--metric) vs. Avg. Layer, one line per method
                         family (and per setting, when the runs hold several), Full as a star
--wandb also logs the table and the figure to one W&B run (offline unless WANDB_API_KEY is set);
--wandb-runs logs one W&B run per row (flat config + numbers), for runs evaluated without logger=wandb.

Columns:
  Avg. Layer  mean decoder layers run per generated token (prefill excluded)
  Speedup     tokens/s / tokens/s(Full)
  % of full   mean over m in {R-1, R-2, R-L, BLEU-1, BERTScore} of m / m(Full) * 100

Full is the full-decoding run of the same setting: same model.name and dataset.name, and the same
model.path, ckpt_path, dataset split and limit, decode.num_beams, do_sample and max_new_tokens (read from
each run's .hydra/config.yaml). A complete Full run is preferred to a partial one. With no Full run of a
setting, its rows leave Speedup and % of full blank; a Full run without tokens/s (e.g. scored on resume)
still gives % of full, only Speedup stays blank. A metric missing from either run, or whose Full value is 0,
is left out of the mean; so is BERTScore when the two runs used different backbones. When the runs of one
table span several settings, each row names its setting after the method ("HSD (s=1, 0, 18) [beams=1]",
only the fields that differ), so no two rows look alike.

Rows: Full first, then CALM, SkipDecode, HSD, each by Avg. Layer descending. Every number is the run's own
metrics.json value. A half-finished run is a row marked "partial (N predictions)", never dropped; its
metrics cells are blank (or its last metrics.json values) and it is not plotted.

Mixed inputs: DIRs whose runs span several models or datasets are refused (exit status 2) unless
--allow-mixed, which writes one table (and figure panel) per (model, dataset).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path
from typing import Any

from hsd_exp.errors import ConfigError
from hsd_exp.report.plots import METRIC_NAMES, plot_quality_vs_layers
from hsd_exp.report.runs import (
    CONFIG_FILE,
    FAMILY_ORDER,
    METRIC_FIELDS,
    NO_RUNS,
    QUALITY_KEYS,
    SETTING_FIELDS,
    RunRecord,
    as_text,
    collect_runs,
    count_predictions,
    family_label,
    find_run_dirs,
    flat_config,
    group_key,
    is_number,
    method_label,
    parse_policy_label,
    policy_name,
    read_run,
    resolved_config,
)

__all__ = [  # the report's own API, plus what it re-exports from hsd_exp.report.runs and hsd_exp.report.plots
    "CONFIG_FILE", "CSV_COLUMNS", "FAMILY_ORDER", "MD_COLUMNS", "METRIC_FIELDS", "METRIC_NAMES", "NO_RUNS",
    "OUTPUT_FILES", "QUALITY_KEYS", "RunRecord", "build_table", "check_not_mixed", "collect_runs",
    "count_predictions", "default_title", "family_label", "find_run_dirs", "group_key", "group_notes",
    "log_wandb", "log_wandb_runs", "main", "markdown_table", "method_label", "parse_args", "parse_policy_label",
    "plot_quality_vs_layers", "read_run", "render_markdown", "retention_vs_full", "setting_names", "wandb_group", "wandb_row_runs",
    "write_csv", "write_report",
]

OUTPUT_FILES = {"md": "report.md", "csv": "report.csv", "png": "quality_vs_layers.png"}

# Markdown table: (header, row key). Status is text; everything else is a number with 2 decimals.
MD_COLUMNS = (
    ("Method", "method"), ("Avg. Layer", "avg_layers"), ("R-1", "rouge1"), ("R-2", "rouge2"),
    ("R-L", "rougeL"), ("BLEU-1", "bleu1"), ("BERTScore", "bertscore_f1"), ("tokens/s", "tokens_per_s"),
    ("Speedup", "speedup"), ("% of full", "pct_full"), ("Status", "status"),
)
CSV_COLUMNS = (
    "model", "dataset", "method", "family", "policy", "s", "min", "max", "d", "criterion", "setting", "num_beams",
    "ckpt_path", "model_path", "split", "limit", "do_sample", "max_new_tokens", "avg_layers", "num_layers",
    *QUALITY_KEYS, "bertscore_model", "tokens_per_s", "speedup", "pct_full", *(f"{k}_pct_full" for k in QUALITY_KEYS), "num_examples", "num_predictions", "status", "path",
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
        baselines = _baselines(group)
        names = setting_names(group)
        # Settings that have a full run first, so the table still starts with "Full".
        group_rows = [_row(run, baselines.get(run.setting), names)
                      for run in sorted(group, key=lambda r: (r.setting not in baselines, *_sort_key(r)))]
        rows += _distinct_methods(group_rows)
    return rows


def setting_names(group: list[RunRecord]) -> dict[tuple, str]:
    """{run.setting: "beams=1, ckpt=PATH"}: the SETTING_FIELDS whose values differ within ``group``, so a row
    names what sets it apart; all "" when the group holds one setting."""
    settings = sorted({r.setting for r in group})
    differ = [i for i in range(len(SETTING_FIELDS)) if len({s[i] for s in settings}) > 1]
    return {s: ", ".join(f"{SETTING_FIELDS[i][1]}={s[i] or '-'}" for i in differ) for s in settings}


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


def _has_quality(run: RunRecord) -> bool:
    return any(is_number(getattr(run, k)) for k in QUALITY_KEYS)


def _baselines(group: list[RunRecord]) -> dict[tuple, RunRecord]:
    """The full-decoding run per setting, chosen for its quality alone (a Full run scored on resume has no
    tokens/s but is still the % of full reference; only Speedup then stays blank): among Full runs with
    quality metrics, a complete one first, then one with tokens/s."""
    best: dict[tuple, RunRecord] = {}
    for run in group:
        if policy_name(run.policy, run.policy_label) != "full" or not _has_quality(run):
            continue
        current = best.get(run.setting)
        if current is None or _baseline_rank(run) > _baseline_rank(current):
            best[run.setting] = run
    return best


def _baseline_rank(run: RunRecord) -> tuple[bool, bool]:
    return (run.complete, is_number(run.tokens_per_s))


def _sort_key(run: RunRecord) -> tuple:
    rank = FAMILY_ORDER.get(policy_name(run.policy, run.policy_label), len(FAMILY_ORDER))
    layers = run.avg_layers if is_number(run.avg_layers) else -math.inf
    return (run.setting, rank, -layers, run.method, str(run.path))


def _row(run: RunRecord, full: RunRecord | None, setting_names: dict[tuple, str]) -> dict:
    setting = setting_names.get(run.setting, "")
    row = {
        "model": run.model, "dataset": run.dataset, "method": run.method, "family": run.family,
        "policy": policy_name(run.policy, run.policy_label), "s": run.s, "min": run.min, "max": run.max,
        "d": run.d, "criterion": run.criterion, "setting": setting, "num_beams": run.num_beams,
        "ckpt_path": run.ckpt_path, "model_path": run.model_path, "split": run.split, "limit": run.limit,
        "do_sample": run.do_sample, "max_new_tokens": run.max_new_tokens,
        "avg_layers": run.avg_layers, "num_layers": run.num_layers,
        **{k: getattr(run, k) for k in QUALITY_KEYS},
        "bertscore_model": run.bertscore_model, "tokens_per_s": run.tokens_per_s,
        "speedup": _ratio(run.tokens_per_s, full.tokens_per_s) if full else None,
    }
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


def _ratio(a: Any, b: Any) -> float | None:
    if not (is_number(a) and is_number(b)) or b == 0:
        return None
    return a / b


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
    """Lines under a group's table: BERTScore backbone(s), missing baseline, partial runs."""
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
    baselines = _baselines(runs)
    if not baselines:
        notes.append("No full-decoding run for these settings: Speedup and % of full are blank.")
    elif any(r.setting not in baselines for r in runs):
        notes.append("Rows without a full-decoding run of the same setting (model.path, ckpt_path, split, limit, "
                     "num_beams, do_sample, max_new_tokens) have blank Speedup and % of full.")
    no_speed = [f"`{full.path}`" for full in baselines.values() if not is_number(full.tokens_per_s)]
    if no_speed:
        notes.append(f"Full run(s) without tokens/s (scored on resume) give % of full but no Speedup: "
                     f"{', '.join(no_speed)}")
    notes.extend(_example_count_notes(runs))
    partial = [row for row in rows if row["status"] != "complete"]
    if partial:
        notes.append(f"{len(partial)} run(s) not complete (see Status); partial runs are not plotted: "
                     + ", ".join(f"`{row['path']}`" for row in partial))
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
        "Speedup = tokens/s / tokens/s(full); % of full = mean over R-1, R-2, R-L, BLEU-1, BERTScore of "
        "metric / metric(full) * 100 (per-metric values in report.csv). Full = the full-decoding run of the "
        "same model, dataset and setting (model.path, ckpt_path, split, limit, num_beams, do_sample, "
        "max_new_tokens). Avg. Layer = mean decoder layers run per generated token.",
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
    paths = {k: out / name for k, name in OUTPUT_FILES.items()}
    rows = build_table(runs)
    write_csv(rows, paths["csv"])
    plot_quality_vs_layers(runs, rows, paths["png"], metric=metric, title=title)  # panels name model/dataset
    paths["md"].write_text(render_markdown(runs, rows, title or default_title(runs), OUTPUT_FILES["png"]),
                           encoding="utf-8")
    return paths


def default_title(runs: list[RunRecord]) -> str:
    keys = sorted({group_key(r) for r in runs})
    if len(keys) == 1:
        return f"Layer-skipping decoding: {keys[0][0]} on {keys[0][1]}"
    return "Layer-skipping decoding comparison"


def log_wandb(runs: list[RunRecord], rows: list[dict], png: Path, title: str, metric: str,
              project: str = "hsd_exp") -> None:
    """One W&B run: the table as wandb.Table plus the figure. Offline unless WANDB_API_KEY (or WANDB_MODE)."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from e
    datasets = sorted({as_text(r.dataset) or "?" for r in runs})
    models = sorted({as_text(r.model) or "?" for r in runs})
    mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
    config = {  # flat dotted keys: W&B's run comparer and parallel-coordinates panels need them
        "report.title": title, "report.metric": metric, "report.num_runs": len(runs),
        "report.datasets": ",".join(datasets), "report.models": ",".join(models),
    }
    run = wandb.init(project=project, group=wandb_group(runs), name=title, job_type="report", config=config,
                     mode=mode)
    try:
        table = wandb.Table(columns=list(CSV_COLUMNS), data=[[_wandb_value(row[k]) for k in CSV_COLUMNS]
                                                             for row in rows])
        run.log({"report": table, "quality_vs_layers": wandb.Image(str(png))})
    finally:
        run.finish()


def wandb_row_runs(runs: list[RunRecord], rows: list[dict]) -> list[dict]:
    """What ``--wandb-runs`` logs per table row: name, config (the run's whole config, flat and resolved,
    plus the row's text fields as ``report.*``) and summary (the row's numbers)."""
    by_path = {str(r.path): r for r in runs}
    out = []
    for row in rows:
        record = by_path.get(str(row["path"]))
        config = flat_config(resolved_config(record)) if record is not None else {}
        config.update({f"report.{k}": _wandb_value(row[k]) for k in CSV_COLUMNS if not is_number(row[k])})
        summary = {k: float(row[k]) for k in CSV_COLUMNS if is_number(row[k])}
        out.append({"name": str(row["method"]), "config": config, "summary": summary})
    return out


def log_wandb_runs(runs: list[RunRecord], rows: list[dict], project: str = "hsd_exp") -> int:
    """One W&B run per table row (``wandb_row_runs``), grouped like the evaluation runs, for evaluations that
    ran without logger=wandb: W&B's run comparer and parallel-coordinates panels then compare the settings.
    Offline unless WANDB_API_KEY (or WANDB_MODE). Returns the number of runs logged."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("--wandb-runs needs the wandb package: pip install wandb") from e
    mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
    entries = wandb_row_runs(runs, rows)
    for entry in entries:
        run = wandb.init(project=project, group=wandb_group(runs), name=entry["name"], job_type="report-row",
                         config=entry["config"], mode=mode)
        try:
            run.summary.update(entry["summary"])
        finally:
            run.finish()
    return len(entries)


def wandb_group(runs: list[RunRecord]) -> str:
    """The W&B group of the evaluation runs reported on (conf/logger/wandb.yaml groups them by ``task_name``),
    so the report lands beside them; several task names joined with "+", "report" when no config names one."""
    names = sorted({as_text(r.config.get("task_name")) for r in runs} - {""})
    return "+".join(names) or "report"


def _wandb_value(value: Any) -> Any:
    """Numbers as floats and everything else as text, so each table column has one type."""
    if value is None:
        return None
    if is_number(value):
        return float(value)
    return str(value)


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hsd_exp.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="multirun or run directories of `python -m hsd_exp`")
    p.add_argument("--out", help="output directory (default: the first DIR)")
    p.add_argument("--title", help="report / figure title (default: names the model and dataset)")
    p.add_argument("--metric", default="rougeL", choices=QUALITY_KEYS, help="figure y axis (default rougeL)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="allow several models/datasets: one table (and figure panel) per (model, dataset)")
    p.add_argument("--wandb", action="store_true", help="also log the table and figure to W&B")
    p.add_argument("--wandb-runs", action="store_true",
                   help="also log one W&B run per row (config + numbers), for runs evaluated without "
                        "logger=wandb: W&B's run comparer and parallel coordinates then compare them")
    p.add_argument("--wandb-project", default="hsd_exp", help="W&B project (default hsd_exp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return int(e.code or 0)
    try:
        runs = collect_runs(args.dirs)
        if not args.allow_mixed:
            check_not_mixed(runs)
        paths = write_report(runs, args.out or args.dirs[0], metric=args.metric, title=args.title)
        rows = build_table(runs)
        if len({as_text(r["bertscore_model"]) for r in rows if r["bertscore_f1"] is not None}) > 1:
            print("warning: runs used different BERTScore backbones; BERTScore values are not comparable",
                  file=sys.stderr)
        print(paths["md"].read_text(encoding="utf-8"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if args.wandb or args.wandb_runs:
        try:
            if args.wandb:
                log_wandb(runs, rows, paths["png"], args.title or default_title(runs), args.metric,
                          project=args.wandb_project)
            if args.wandb_runs:
                log_wandb_runs(runs, rows, project=args.wandb_project)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # the report files are written; say what failed instead of a stack trace
            print(f"error: W&B logging failed ({type(e).__name__}: {e}); report files are written", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
