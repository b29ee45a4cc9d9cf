"""Comparison report over evaluation runs: ``python -m hsd_exp.report DIR [DIR ...]``.

Each DIR is a Hydra multirun dir (job subfolders with ``.hydra/config.yaml``, ``metrics.json``,
``predictions.jsonl``; see DEVELOPERS.md "Run directory format") or a single run dir. Every folder below
DIR holding ``.hydra/config.yaml``, ``metrics.json`` or ``predictions*.jsonl`` is one run (``task=compare``
subfolders included; they take model/dataset/decode from the parent's config). ``metrics.json`` says what
ran; the config (read raw: interpolations are not resolved) fills in what it lacks. A run without
``metrics.json`` (or with ``"complete": false``) is half-finished: it gets a row marked
``partial (N predictions)``, never dropped.

The table follows the HSD paper's layout: one row per decoding setting, one table per (model, dataset).

    Speedup    = tokens/s / tokens/s(full)
    % of full  = mean over m in {R-1, R-2, R-L, BLEU-1, BERTScore} of  m / m(full) * 100
    (the CSV also holds each metric's retention ``<m>_pct_full``)

where ``full`` is the full-decoding run of the same model, dataset and decode settings (``decode.num_beams``
and ``ckpt_path``); with no such run both columns stay blank. A metric missing from either run, or whose
full value is 0, is left out of the mean; so is BERTScore when the two runs used different backbones.
Rows: Full first, then CALM, SkipDecode, HSD, each by Avg. Layer descending. Every number in the table is
the run's own ``metrics.json`` value (Markdown rounds to 2 decimals; the CSV keeps full precision).

Outputs (into ``--out``, default the first DIR): ``report.md``, ``report.csv`` and
``quality_vs_layers.png`` (the paper's Fig. 1: quality vs. Avg. Layer, one line per method family).
``--wandb`` also logs the table and the figure to one W&B run (offline unless WANDB_API_KEY is set).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsd_exp.errors import ConfigError
from hsd_exp.predictions import METRICS_FILE, PREDICTIONS_FILE

QUALITY_KEYS = ("rouge1", "rouge2", "rougeL", "bleu1", "bertscore_f1")
METRIC_FIELDS = (*QUALITY_KEYS, "bertscore_model", "avg_layers", "tokens_per_s", "num_examples", "num_layers")
METRIC_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu1": "BLEU-1",
                "bertscore_f1": "BERTScore F1"}
FAMILY_ORDER = {"full": 0, "calm": 1, "skipdecode": 2, "hsd": 3}
CONFIG_FILE = Path(".hydra") / "config.yaml"
OUTPUT_FILES = {"md": "report.md", "csv": "report.csv", "png": "quality_vs_layers.png"}

# Markdown table: (header, row key). Status is text; everything else is a number with 2 decimals.
MD_COLUMNS = (
    ("Method", "method"), ("Avg. Layer", "avg_layers"), ("R-1", "rouge1"), ("R-2", "rouge2"),
    ("R-L", "rougeL"), ("BLEU-1", "bleu1"), ("BERTScore", "bertscore_f1"), ("tokens/s", "tokens_per_s"),
    ("Speedup", "speedup"), ("% of full", "pct_full"), ("Status", "status"),
)
CSV_COLUMNS = (
    "model", "dataset", "method", "family", "policy", "s", "min", "max", "d", "criterion", "num_beams",
    "ckpt_path", "avg_layers", "num_layers", *QUALITY_KEYS, "bertscore_model", "tokens_per_s", "speedup",
    "pct_full", *(f"{k}_pct_full" for k in QUALITY_KEYS), "num_examples", "num_predictions", "status", "path",
)

NO_RUNS = ("no runs found under {dir}: expected folders with .hydra/config.yaml or metrics.json "
           "(a multirun dir of `python -m hsd_exp -m ...`)")


# -----------------------------------------------------------------------------
# Reading runs


@dataclass
class RunRecord:
    """One evaluation run: what its config says it ran and what its metrics.json measured (None = missing)."""

    path: Path
    status: str  # "complete", "partial (N predictions)" or "unreadable: ..."
    complete: bool = False
    num_predictions: int | None = None
    model: str | None = None
    dataset: str | None = None
    policy: str | None = None  # policy.name: full | calm | skipdecode | hsd
    policy_label: str | None = None  # metrics.json's label, e.g. "hsd(s=1,0,18)"
    s: Any = None
    min: Any = None
    max: Any = None
    d: Any = None
    criterion: Any = None
    num_beams: Any = None
    ckpt_path: Any = None
    rouge1: Any = None
    rouge2: Any = None
    rougeL: Any = None
    bleu1: Any = None
    bertscore_f1: Any = None
    bertscore_model: Any = None
    avg_layers: Any = None
    tokens_per_s: Any = None
    num_examples: Any = None
    num_layers: Any = None
    config: dict = field(default_factory=dict, repr=False)  # raw (unresolved) .hydra/config.yaml

    @property
    def method(self) -> str:
        """The paper's row name: "Full", "CALM (d=0.02)", "SkipDecode (10,20)", "HSD (s=1, 0, 18)"."""
        return method_label(self.policy, self.s, self.min, self.max, self.d, self.criterion, self.policy_label)

    @property
    def family(self) -> str:
        """Plot line / sort group: "Full", "CALM", "SkipDecode", "HSD s=1", "HSD s=2"."""
        return family_label(self.policy, self.s, self.criterion, self.policy_label)

    @property
    def setting(self) -> tuple[str, str]:
        """Decode settings a speedup baseline must share (besides model and dataset)."""
        return (_text(self.num_beams), _text(self.ckpt_path))


def collect_runs(dirs: Iterable[str | os.PathLike]) -> list[RunRecord]:
    """Every run below each of ``dirs`` (sorted by path). Raises ConfigError if a DIR holds no run."""
    runs: dict[Path, RunRecord] = {}
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ConfigError(f"{root} does not exist: pass a run or multirun directory of `python -m hsd_exp`")
        found = find_run_dirs(root)
        if not found:
            raise ConfigError(NO_RUNS.format(dir=root))
        for run_dir in found:
            key = run_dir.resolve()
            if key not in runs:
                runs[key] = read_run(run_dir)
    return sorted(runs.values(), key=lambda r: str(r.path))


def find_run_dirs(root: Path) -> list[Path]:
    """Run folders at or below ``root`` (hidden dirs skipped).

    A run folder holds ``.hydra/config.yaml``, ``metrics.json`` or ``predictions*.jsonl``. A folder whose
    config has no results of its own but run folders below it is the parent of a ``task=compare`` run
    (one subfolder per policy): only the subfolders are runs.
    """
    marked = []
    for here, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        here = Path(here)
        if _has_results(files) or (here / CONFIG_FILE).is_file():
            marked.append(here)
    return [d for d in marked if _has_results(os.listdir(d)) or not any(d in m.parents for m in marked)]


def _has_results(files: Iterable[str]) -> bool:
    return any(f == METRICS_FILE or _is_predictions_file(f) for f in files)


def _is_predictions_file(name: str) -> bool:  # predictions.jsonl, or predictions.rank<N>.jsonl under DDP
    stem, suffix = os.path.splitext(PREDICTIONS_FILE)
    return name.startswith(stem) and name.endswith(suffix)


def read_run(run_dir: Path) -> RunRecord:
    """A RunRecord from a run dir; never raises for a broken or half-finished run (its status says why)."""
    record = RunRecord(path=run_dir, status="complete")
    problems = []
    try:
        _apply_config(record, run_dir)
    except Exception as e:  # a broken config must not hide the other runs
        problems.append(f"unreadable {CONFIG_FILE} ({type(e).__name__})")
    try:
        metrics = _load_metrics(run_dir / METRICS_FILE)
    except (OSError, ValueError) as e:
        metrics = None
        problems.append(f"unreadable {METRICS_FILE} ({type(e).__name__})")
    if metrics is not None:
        _apply_metrics(record, metrics)
    if record.s is None and record.min is None and record.d is None and record.policy_label:
        _set_params(record, parse_policy_label(record.policy_label))
    # metrics.json is written when a run finishes; only an explicit "complete": false says otherwise.
    record.complete = metrics is not None and metrics.get("complete", True) is not False
    record.num_predictions = count_predictions(run_dir)
    if not record.complete:
        record.status = f"partial ({record.num_predictions} predictions)"
    if problems:
        record.status = "; ".join([record.status, *problems])
    return record


CONFIG_KEYS = (("model", "model.name"), ("dataset", "dataset.name"), ("num_beams", "decode.num_beams"),
               ("ckpt_path", "ckpt_path"))
POLICY_KEYS = ("s", "min", "max", "d", "criterion")


def _apply_config(record: RunRecord, run_dir: Path) -> None:
    """Fields from the run's own config or, for a ``task=compare`` subfolder, its parent's (whose policy
    group is not the subfolder's policy: that one is the ``compare_policies`` entry named like the folder)."""
    own = run_dir / CONFIG_FILE
    path = own if own.is_file() else run_dir.parent / CONFIG_FILE
    if not path.is_file():
        return
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)  # interpolations stay unresolved: they may use resolvers not registered here
    raw = OmegaConf.to_container(cfg, resolve=False)
    record.config = raw if isinstance(raw, dict) else {}
    for attr, key in CONFIG_KEYS:
        setattr(record, attr, _config_value(cfg, record.config, key))
    if path == own:
        record.policy = _config_value(cfg, record.config, "policy.name")
        _set_params(record, {k: _config_value(cfg, record.config, f"policy.{k}") for k in POLICY_KEYS})
    else:
        _apply_compare_policy(record, record.config.get("compare_policies"), run_dir.name)


def _config_value(cfg: Any, raw: dict, key: str) -> Any:
    """``raw[key]`` (dotted); an interpolation like ``${model.num_layers}`` is resolved for this key alone
    when it can be (custom resolvers may be unregistered here), else the raw string is kept."""
    value: Any = raw
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, str) and "${" in value:
        from omegaconf import OmegaConf

        try:
            resolved = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except Exception:
            return value
        return value if resolved is None else resolved
    return value


def _apply_compare_policy(record: RunRecord, entries: Any, folder: str) -> None:
    """The ``compare_policies`` entry whose label slug names ``folder`` (how task=compare names them)."""
    from hsd_exp.policies import build_policy

    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or "name" not in entry:
            continue
        params = {k: v for k, v in entry.items() if k not in ("_target_", "name")}
        try:
            label = build_policy(entry["name"], **params).label
        except Exception:  # e.g. an unresolved interpolation as a parameter
            continue
        if _slug(label) == folder:
            record.policy, record.policy_label = entry["name"], label
            _set_params(record, params)
            return
    record.policy_label = folder  # unknown policy: at least name the row after its folder


def _slug(label: str) -> str:
    """hsd_exp.tasks._slug (a copy: importing tasks would load Lightning)."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in label).strip("_")


def _set_params(record: RunRecord, params: dict) -> None:
    for key in POLICY_KEYS:
        if params.get(key) is not None:
            setattr(record, key, params[key])


def _load_metrics(path: Path) -> dict | None:
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} is not a JSON object")
    return metrics


def _apply_metrics(record: RunRecord, metrics: dict) -> None:
    """metrics.json values as they are; what it says ran (model, dataset, policy, decode) wins over the config."""
    for key in METRIC_FIELDS:
        setattr(record, key, metrics.get(key))
    for key in ("model", "dataset", "policy", "policy_label", "num_beams", "ckpt_path"):
        if metrics.get(key) is not None:
            setattr(record, key, metrics[key])
    if isinstance(metrics.get("policy_params"), dict):
        _set_params(record, metrics["policy_params"])


def count_predictions(run_dir: Path) -> int:
    """Complete JSON lines in the run's predictions*.jsonl (a torn last line from a crash does not count)."""
    n = 0
    for path in sorted(run_dir.iterdir()):
        if path.is_file() and _is_predictions_file(path.name):
            n += _count_lines(path)
    return n


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n") or not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError:
                continue
            n += 1
    return n


# -----------------------------------------------------------------------------
# Labels


_LABEL_RE = (  # Policy.label formats (hsd_exp/policies.py)
    re.compile(r"hsd\(s=(?P<s>[^,]+),(?P<min>[^,]+),(?P<max>[^,)]+)\)"),
    re.compile(r"skipdecode\((?P<min>[^,]+),(?P<max>[^,)]+)\)"),
    re.compile(r"calm\(d=(?P<d>[^,)]+)(?:,(?P<criterion>[^,)]+))?\)"),
)


def parse_policy_label(label: str) -> dict:
    """Parameters from a ``Policy.label`` ("hsd(s=1,0,18)" -> {"s": 1, "min": 0, "max": 18}); {} if unknown."""
    for pattern in _LABEL_RE:
        m = pattern.fullmatch(label.strip())
        if m:
            return {k: _number(v) for k, v in m.groupdict().items() if v is not None}
    return {}


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _fmt_param(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _policy_name(policy: str | None, label: str | None) -> str:
    if policy:
        return str(policy)
    return re.split(r"[(\s]", label or "", maxsplit=1)[0] or "?"


def method_label(policy, s=None, lo=None, hi=None, d=None, criterion=None, fallback=None) -> str:
    """The paper's row names. CALM names its criterion only when it is not the paper's softmax."""
    name = _policy_name(policy, fallback)
    p = _fmt_param
    if name == "full":
        return "Full"
    if name == "calm" and d is not None:
        crit = "" if criterion in (None, "softmax") else f", {criterion}"
        return f"CALM (d={p(d)}{crit})"
    if name == "skipdecode" and lo is not None and hi is not None:
        return f"SkipDecode ({p(lo)},{p(hi)})"
    if name == "hsd" and s is not None and lo is not None and hi is not None:
        return f"HSD (s={p(s)}, {p(lo)}, {p(hi)})"
    return fallback or name


def family_label(policy, s=None, criterion=None, fallback=None) -> str:
    name = _policy_name(policy, fallback)
    if name == "hsd":
        return f"HSD s={_fmt_param(s)}" if s is not None else "HSD"
    if name == "calm":
        return "CALM" if criterion in (None, "softmax") else f"CALM ({criterion})"
    return {"full": "Full", "skipdecode": "SkipDecode"}.get(name, name)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# -----------------------------------------------------------------------------
# Table


def group_key(run: RunRecord) -> tuple[str, str]:
    return (_text(run.model) or "?", _text(run.dataset) or "?")


def check_not_mixed(runs: list[RunRecord]) -> None:
    """ConfigError if the runs span several datasets or models (a table must compare like with like)."""
    for what, attr in (("datasets", "dataset"), ("models", "model")):
        counts: dict[str, int] = {}
        for run in runs:
            value = _text(getattr(run, attr)) or "?"
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
        several_settings = len({r.setting for r in group}) > 1
        # Decode settings that have a full run first, so the table still starts with "Full".
        for run in sorted(group, key=lambda r: (r.setting not in baselines, *_sort_key(r))):
            rows.append(_row(run, baselines.get(run.setting), several_settings))
    return rows


def _baselines(group: list[RunRecord]) -> dict[tuple[str, str], RunRecord]:
    """The full-decoding run per decode setting: a complete one if any, else one that has metrics."""
    best: dict[tuple[str, str], RunRecord] = {}
    for run in group:
        if _policy_name(run.policy, run.policy_label) != "full" or run.tokens_per_s is None:
            continue
        current = best.get(run.setting)
        if current is None or (run.complete and not current.complete):
            best[run.setting] = run
    return best


def _sort_key(run: RunRecord) -> tuple:
    rank = FAMILY_ORDER.get(_policy_name(run.policy, run.policy_label), len(FAMILY_ORDER))
    layers = run.avg_layers if _is_number(run.avg_layers) else -math.inf
    return (run.setting, rank, -layers, run.method, str(run.path))


def _row(run: RunRecord, full: RunRecord | None, several_settings: bool) -> dict:
    row = {
        "model": run.model, "dataset": run.dataset, "method": run.method, "family": run.family,
        "policy": _policy_name(run.policy, run.policy_label), "s": run.s, "min": run.min, "max": run.max,
        "d": run.d, "criterion": run.criterion, "num_beams": run.num_beams, "ckpt_path": run.ckpt_path,
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
    if several_settings:  # tell apart e.g. greedy and beam-4 runs of the same policy
        row["method"] += f" [{_setting_text(row)}]"
    return {k: row[k] for k in CSV_COLUMNS}


def retention_vs_full(run: RunRecord, full: RunRecord) -> dict[str, float | None]:
    """{metric: metric / metric(full) * 100} (hsd_exp.metrics.quality_retention); None where either is
    missing or full is 0, and for BERTScore when the backbones differ (such scores are not comparable)."""
    from hsd_exp.metrics import quality_retention

    out = quality_retention({k: getattr(run, k) for k in QUALITY_KEYS}, {k: getattr(full, k) for k in QUALITY_KEYS})
    if run.bertscore_model != full.bertscore_model:
        out["bertscore_f1"] = None
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(a: Any, b: Any) -> float | None:
    if not (_is_number(a) and _is_number(b)) or b == 0:
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
    if _is_number(value) and key not in ("method", "status"):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def group_notes(rows: list[dict], runs: list[RunRecord]) -> list[str]:
    """Lines under a group's table: BERTScore backbone(s), missing baseline, partial runs."""
    notes = []
    backbones: dict[str, list[str]] = {}
    for row in rows:
        if row["bertscore_f1"] is not None:
            backbones.setdefault(_text(row["bertscore_model"]) or "unknown", []).append(row["method"])
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
    if not any(row["speedup"] is not None for row in rows):
        notes.append("No full-decoding run with tokens/s for these settings: Speedup and % of full are blank.")
    elif any(row["speedup"] is None and row["tokens_per_s"] is not None for row in rows):
        notes.append("Rows without a full-decoding run of the same decode settings (num_beams, ckpt_path) "
                     "have blank Speedup and % of full.")
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
        group_rows = [row for row in rows if (_text(row["model"]) or "?", _text(row["dataset"]) or "?") == key]
        group_runs = [r for r in runs if group_key(r) == key]
        parts += [f"## {key[0]} / {key[1]}", "", markdown_table(group_rows), ""]
        parts += [f"- {note}" for note in group_notes(group_rows, group_runs)] + [""]
    parts += [
        "Speedup = tokens/s / tokens/s(full); % of full = mean over R-1, R-2, R-L, BLEU-1, BERTScore of "
        "metric / metric(full) * 100 (per-metric values in report.csv). Full = the full-decoding run of the "
        "same model, dataset and decode settings. Avg. Layer = mean decoder layers run per generated token.",
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
# Figure (the paper's Fig. 1)

FAMILY_STYLE = {"HSD s=1": ("tab:red", "o"), "HSD s=2": ("tab:orange", "s"), "SkipDecode": ("tab:blue", "^"),
                "CALM": ("tab:green", "D")}


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
        group = [row for row in rows if (_text(row["model"]) or "?", _text(row["dataset"]) or "?") == key]
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
    points = [r for r in rows if r["status"] == "complete" and _is_number(r["avg_layers"]) and _is_number(r[metric])]
    if not points:
        ax.text(0.5, 0.5, "no complete runs with this metric", ha="center", va="center", transform=ax.transAxes)
        return
    several_settings = len({_setting_text(r) for r in rows}) > 1
    lines: dict[tuple, list[dict]] = {}
    for row in points:
        key = (FAMILY_ORDER.get(row["policy"], len(FAMILY_ORDER)), row["family"], _setting_text(row))
        lines.setdefault(key, []).append(row)
    for (_, family, setting), members in sorted(lines.items()):
        members.sort(key=lambda r: r["avg_layers"])
        xs, ys = [r["avg_layers"] for r in members], [r[metric] for r in members]
        label = f"{family} [{setting}]" if several_settings else family
        if family == "Full":  # the reference: a star and a horizontal line at its quality
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=0.8, alpha=0.6)
            ax.scatter(xs, ys, marker="*", s=220, color="black", zorder=3, label=label)
            continue
        color, marker = FAMILY_STYLE.get(family, (None, "o"))
        ax.plot(xs, ys, marker=marker, color=color, label=label)
    ax.legend(loc="best", fontsize="small")


def _setting_text(row: dict) -> str:
    parts = [f"beams={_text(row['num_beams']) or '?'}"]
    if row["ckpt_path"]:
        parts.append(f"ckpt={row['ckpt_path']}")
    return ", ".join(parts)


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
    datasets = sorted({_text(r.dataset) or "?" for r in runs})
    models = sorted({_text(r.model) or "?" for r in runs})
    mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
    config = {  # flat dotted keys: W&B's run comparer and parallel-coordinates panels need them
        "report.title": title, "report.metric": metric, "report.num_runs": len(runs),
        "report.datasets": ",".join(datasets), "report.models": ",".join(models),
    }
    run = wandb.init(project=project, group=datasets[0] if len(datasets) == 1 else "mixed", name=title,
                     job_type="report", config=config, mode=mode)
    try:
        table = wandb.Table(columns=list(CSV_COLUMNS), data=[[_wandb_value(row[k]) for k in CSV_COLUMNS]
                                                             for row in rows])
        run.log({"report": table, "quality_vs_layers": wandb.Image(str(png))})
    finally:
        run.finish()


def _wandb_value(value: Any) -> Any:
    """Numbers as floats and everything else as text, so each table column has one type."""
    if value is None:
        return None
    if _is_number(value):
        return float(value)
    return str(value)


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hsd_exp.report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="multirun or run directories of `python -m hsd_exp`")
    p.add_argument("--out", help="output directory (default: the first DIR)")
    p.add_argument("--title", help="report / figure title (default: names the model and dataset)")
    p.add_argument("--metric", default="rougeL", choices=QUALITY_KEYS, help="figure y axis (default rougeL)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="allow several models/datasets: one table (and figure panel) per (model, dataset)")
    p.add_argument("--wandb", action="store_true", help="also log the table and figure to W&B")
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
        if len({_text(r["bertscore_model"]) for r in rows if r["bertscore_f1"] is not None}) > 1:
            print("warning: runs used different BERTScore backbones; BERTScore values are not comparable",
                  file=sys.stderr)
        print(paths["md"].read_text(encoding="utf-8"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if args.wandb:
        try:
            log_wandb(runs, rows, paths["png"], args.title or default_title(runs), args.metric,
                      project=args.wandb_project)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # the report files are written; say what failed instead of a stack trace
            print(f"error: W&B logging failed ({type(e).__name__}: {e}); report files are written", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
