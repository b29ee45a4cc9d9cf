"""W&B for the report: ``--wandb`` logs the table and figure to one run, ``--wandb-runs`` one run per row.

Offline unless WANDB_API_KEY (or WANDB_MODE) is set. W&B's files (``wandb/offline-run-*``, ``wandb/run-*``) go
into the report's output folder beside report.md, not the current folder (``WANDB_DIR``, when set, wins). Named
wandb_log, not wandb, so that ``import wandb`` inside this package always means the W&B client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hsd_exp.errors import ConfigError
from hsd_exp.report.runs import RunRecord, as_text, is_number
from hsd_exp.report.tables import CSV_COLUMNS
from hsd_exp.run_folder import flat_config


def wandb_dir(out_dir: str | os.PathLike | None) -> str | None:
    """Where W&B writes its run folder: ``$WANDB_DIR`` when set, else the report's ``out_dir`` (None: W&B's own
    default, the current folder). ``$WANDB_DIR`` is passed explicitly: W&B reads the environment once per process
    (its first ``wandb.init``), so a later change of it was ignored."""
    if os.environ.get("WANDB_DIR"):
        return os.environ["WANDB_DIR"]
    if out_dir is None:
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return str(out_dir)


def log_wandb(runs: list[RunRecord], rows: list[dict], png: Path, title: str, metric: str,
              project: str = "hsd_exp", out_dir: str | os.PathLike | None = None) -> None:
    """One W&B run: the table as wandb.Table plus the figure, its files under ``out_dir`` (``wandb_dir``).
    Offline unless WANDB_API_KEY (or WANDB_MODE)."""
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
                     mode=mode, dir=wandb_dir(out_dir))
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


def log_wandb_runs(runs: list[RunRecord], rows: list[dict], project: str = "hsd_exp",
                   out_dir: str | os.PathLike | None = None) -> int:
    """One W&B run per table row (``wandb_row_runs``), grouped like the evaluation runs, for evaluations that
    ran without logger=wandb: W&B's run comparer and parallel-coordinates panels then compare the settings.
    Their files go under ``out_dir`` (``wandb_dir``). Offline unless WANDB_API_KEY (or WANDB_MODE). Returns the
    number of runs logged."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("--wandb-runs needs the wandb package: pip install wandb") from e
    mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
    entries = wandb_row_runs(runs, rows)
    for entry in entries:
        run = wandb.init(project=project, group=wandb_group(runs), name=entry["name"], job_type="report-row",
                         config=entry["config"], mode=mode, dir=wandb_dir(out_dir))
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


def resolved_config(record: RunRecord) -> dict:
    """The run's .hydra/config.yaml with its interpolations resolved where they resolve (Hydra's own
    resolvers, such as ``now``, do not outside a Hydra run: then the raw values)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(record.config), resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: keep the file's text
        return record.config
