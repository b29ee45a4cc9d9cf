"""Streamed ``predictions.jsonl`` (crash-safe, resumable) and atomic ``metrics.json``.

One JSON object per line: ``{"id", "source", "references", "prediction", "layers_per_token", ...}``.
Every line is flushed and fsync'ed as soon as it is written, so a crash loses at most the line being
written. That torn last line (no trailing newline, or not valid JSON) is cut off when the writer reopens
the file; readers ignore it. Resume = the caller skips the ids in ``PredictionWriter.done_ids()``.

``metrics.json`` is written atomically (``hsd_exp.atomic.write_atomic``: a temp file beside it, fsync'ed, renamed
over it), so a reader never sees a half-written file. The file names are ``hsd_exp.run_folder``'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from hsd_exp.atomic import write_atomic
from hsd_exp.errors import ConfigError
from hsd_exp.run_folder import METRICS_FILE, PREDICTIONS_FILE, is_predictions_file


def _file(path: str | os.PathLike) -> Path:
    """``path`` itself if it names a file (or a *.jsonl), else ``path/predictions.jsonl``."""
    path = Path(path)
    return path if path.suffix == ".jsonl" or path.is_file() else path / PREDICTIONS_FILE


def _scan(file: Path) -> tuple[list[dict], int]:
    """(records, byte length of the valid prefix). Only a torn *last* line is tolerated."""
    if not file.exists():
        return [], 0
    data = file.read_bytes()
    records, good_end, start = [], 0, 0
    while start < len(data):
        end = data.find(b"\n", start)
        line = data[start : len(data) if end < 0 else end]
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = False  # not JSON
        if record is not None and not isinstance(record, dict):
            record = False
        if end < 0 and record:  # a complete record whose newline was lost: keep it
            records.append(record)
            good_end = len(data)
            break
        if end < 0 or record is False:
            if end >= 0 and data[end + 1 :].strip():  # a bad line with more lines after it
                raise ConfigError(
                    f"{file} line {len(records) + 1} is not valid JSON and is not the last line; "
                    f"delete that line (or the file) and resume"
                )
            break  # torn last line from a crash: drop it
        if record is not None:
            records.append(record)
        good_end = end + 1
        start = end + 1
    return records, good_end


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """All complete records of a predictions file (``path`` = the file or its run dir)."""
    return _scan(_file(path))[0]


def read_run_predictions(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of a run dir, each id once: ``predictions.jsonl``, or under DDP ``predictions.rank<N>.jsonl``
    (DistributedSampler repeats examples to even out the ranks, so an id can be in two files)."""
    files = sorted(f for f in Path(run_dir).glob("*.jsonl") if is_predictions_file(f.name))
    return list({str(r["id"]): r for f in files for r in read_predictions(f) if "id" in r}.values())


def examples_hash(records: list[dict]) -> str:
    """Which examples a run scored, as 16 hex digits of the SHA-256 of their (id, source, references), taken in
    id order: two runs of one setting on other data (another dataset.path or limit, an edited file) differ,
    whatever order or ranks they were generated in. metrics.json records it; the report pairs on it."""
    rows = sorted(json.dumps([str(r.get("id")), r.get("source"), r.get("references")], ensure_ascii=False)
                  for r in records)
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()[:16]


class PredictionWriter:
    """Append-only, fsync'ed writer of ``predictions.jsonl``; reopening resumes after a crash.

    Usage::

        with PredictionWriter(run_dir) as w:
            todo = [ex for ex in examples if ex.id not in w.done_ids()]
            for ex in todo:
                w.write(ex.id, ex.source, ex.references, prediction, layers_per_token)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _file(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records, good_end = _scan(self.path)
        if self.path.exists() and self.path.stat().st_size != good_end:
            with open(self.path, "r+b") as f:  # cut the torn last line so appends start clean
                f.truncate(good_end)
                os.fsync(f.fileno())
        if good_end:
            with open(self.path, "r+b") as f:
                f.seek(good_end - 1)
                if f.read(1) != b"\n":  # the last record lost its newline
                    f.write(b"\n")
                    os.fsync(f.fileno())
        self._done = {str(r["id"]) for r in records if "id" in r}
        self._f = open(self.path, "a", encoding="utf-8")

    def done_ids(self) -> set[str]:
        """Ids already written (by this writer or an earlier, possibly crashed, run)."""
        return set(self._done)

    def write(
        self,
        id: str,
        source: str,
        references: list[str],
        prediction: str,
        layers_per_token: list[int | float],
        **extra: Any,
    ) -> None:
        record = {
            "id": str(id),
            "source": source,
            "references": list(references),
            "prediction": prediction,
            "layers_per_token": [_plain(x) for x in layers_per_token],
            **{k: _plain(v) for k, v in extra.items()},
        }
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._done.add(record["id"])

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_metrics(run_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write ``run_dir/metrics.json`` atomically, as readable as the predictions beside it. NaN/inf -> null."""
    text = json.dumps({k: _plain(v) for k, v in metrics.items()}, indent=2, allow_nan=False) + "\n"
    return write_atomic(Path(run_dir) / METRICS_FILE, text)


def _plain(value: Any) -> Any:
    """JSON-safe: tensors/numpy scalars -> Python numbers, non-finite floats -> None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
