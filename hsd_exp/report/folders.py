"""Which folders are runs (their files: hsd_exp.run_folder), and how many predictions one holds."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from hsd_exp.run_folder import CONFIG_FILE, METRICS_FILE, is_predictions_file


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
    return any(f == METRICS_FILE or is_predictions_file(f) for f in files)


def count_predictions(run_dir: Path) -> int:
    """Complete JSON lines in the run's predictions*.jsonl (a torn last line from a crash does not count)."""
    n = 0
    for path in sorted(run_dir.iterdir()):
        if path.is_file() and is_predictions_file(path.name):
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
