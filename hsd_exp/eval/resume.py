"""Resuming an evaluation in its run folder: refuse what would mix two settings' predictions in one metrics.json.

A run folder only grows: a rerun skips the ids already in its predictions files and scores them all at the end.
That is right only when the rerun decodes what the folder holds (``run.json``, ``run_folder.resume_key``) and
its ``dataset.limit`` covers every example there.
"""

from __future__ import annotations

import json
from pathlib import Path

from hsd_exp.atomic import write_atomic
from hsd_exp.errors import ConfigError
from hsd_exp.run_folder import RUN_FILE


def check_resume_limit(run_dir: Path, limit: int | None, scored: int) -> None:
    """Refuse to resume ``run_dir`` under a ``dataset.limit`` below the number of examples it already holds:
    its metrics cover every prediction in the folder, so they would be labelled with a limit they exceed.
    A larger limit (or none) extends the run."""
    if limit is not None and scored > int(limit):
        raise ConfigError(f"{run_dir} holds predictions for {scored} examples but dataset.limit={limit}: its "
                          f"metrics would cover all {scored} (a run folder only grows). Resume it with "
                          f"dataset.limit={scored} or more (or null), give this run its own folder "
                          f"(hydra.run.dir=...), or delete {run_dir} to start over")


def check_resume_setting(run_dir: Path, key: dict, resuming: bool) -> None:
    """Refuse to resume ``run_dir`` with another ``key`` (``run_folder.resume_key``: one metrics.json would mix
    two settings' predictions); otherwise record ``key`` in its ``run.json``. A folder from before run.json
    adopts the current key, and a run.json from before a field (the prompt format) adopts that field's value."""
    path = Path(run_dir) / RUN_FILE
    if resuming and path.is_file():
        before = json.loads(path.read_text())
        now = json.loads(json.dumps(key))  # the types JSON gives back (tuples as lists)
        # A key the folder's run.json lacks predates that field (the prompt format came later): adopt it.
        diff = [k for k in sorted(before) if before[k] != now.get(k)]
        if diff:
            what = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in diff)
            raise ConfigError(f"{run_dir} holds predictions of another setting ({what}): resuming would mix them. "
                              f"Give this run its own folder (hydra.run.dir=...), or delete {run_dir} to start over")
        if all(now[k] is None for k in set(now) - set(before)):  # a missing key reads as null: the same key
            return
    write_atomic(path, json.dumps(key, indent=1) + "\n")  # DDP: every rank writes the same content
