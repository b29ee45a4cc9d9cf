"""Local dataset files: ``dataset.path`` resolved to a folder (or one file, or the bundled sample) and one
split's rows read from it, normalised to the Hub schema (formats: ``hsd_exp.data.loaders``'s docstring)."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

from hsd_exp.data.releases import (
    ORIGINAL_FILES,
    SPLIT_ALIASES,
    normalise,
    read_release_dir,
    release_splits,
    text_lines,
)
from hsd_exp.errors import ConfigError

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


def sample_dir(name: str) -> Path:
    """The bundled sample of dataset ``name`` (``dataset.path=sample``)."""
    return SAMPLES_DIR / name


def resolve_path(cfg: dict) -> Path:
    raw = str(cfg["path"])
    if raw == "sample":
        path = sample_dir(str(cfg.get("name")))
        if not path.is_dir():
            have = sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_dir()) if SAMPLES_DIR.is_dir() else []
            raise ConfigError(
                f"dataset.path=sample: there is no bundled sample for dataset {cfg.get('name')!r} "
                f"(samples: {have}); set dataset.path=DIR to a local copy"
            )
        return path
    path = Path(raw).expanduser()
    if not path.is_absolute() and not path.exists():
        path = _original_cwd() / path  # Hydra may have changed the working directory
    if not path.exists():
        raise ConfigError(
            f"dataset.path={raw!r} does not exist (resolved to {path.resolve()}); set dataset.path=DIR to "
            f"a directory with {cfg.get('split') or 'test'}.jsonl (or the original release files), or "
            f"dataset.path=null to load {cfg.get('hub_id')!r} from the Hub"
        )
    return path


def _original_cwd() -> Path:
    with contextlib.suppress(Exception):
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd())
    return Path.cwd()


def split_file(directory: Path, split: str) -> Path | None:
    for stem in [split, *SPLIT_ALIASES.get(split, [])]:
        for ext in EXTENSIONS:
            if (directory / f"{stem}{ext}").is_file():
                return directory / f"{stem}{ext}"
    for name in ORIGINAL_FILES.get(split, []):
        if (directory / name).is_file():
            return directory / name
    return None


def _existing_splits(directory: Path) -> list[str]:
    found = {s for s in ("train", "validation", "test") if split_file(directory, s)} | release_splits(directory)
    known = {name for names in ORIGINAL_FILES.values() for name in names}
    aliases = {a for names in SPLIT_ALIASES.values() for a in names}
    found |= {p.stem for p in directory.iterdir() if p.suffix in EXTENSIONS and p.name not in known}
    return sorted(found - aliases)


def read_local(path: Path, split: str, cfg: dict) -> list[dict]:
    """Rows of one split from a directory (or from ``path`` itself when it is a file)."""
    if path.is_file():
        rows = normalise(_read_file(path))
    elif (file := split_file(path, split)) is not None:
        rows = normalise(_read_file(file))
    else:
        rows = read_release_dir(path, split, cfg)
        if rows is None:
            raise ConfigError(missing_split(path, split))
    for i, row in enumerate(rows):
        row.setdefault("_index", i)
    return rows


def missing_split(path: Path, split: str) -> str:
    """Why ``split`` cannot be read from the directory ``path``, and the fix. Fine-tuning always reads the train
    split (dataset.split picks the evaluation split only), so for it the fix is a train file, not dataset.split."""
    have = _existing_splits(path)
    if split != "train":
        return f"split {split!r} not found in dataset.path={str(path)!r}: it has the splits {have}; set " \
               "dataset.split=<one of them>"
    carve = f"dataset.split_fractions={{train:0.9,{have[0]}:0.1}} dataset.split_source={have[0]}" if have else ""
    return (f"fine-tuning reads the train split, and dataset.path={str(path)!r} has none (it has {have}): add "
            f"train.jsonl (or .json, .csv, .parquet; one row per example with the source and target fields)"
            + (f", or carve one out of {have[0]} with {carve}" if carve else ""))


def _json_lines(file: Path, text: str) -> list[dict]:
    """One JSON object per line; a bad line is named by its line number in the file (json's own
    "line 1 column 39" counts within the line)."""
    rows = []
    for number, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise ConfigError(f"{file}, line {number}: not valid JSON ({e.msg} at column {e.colno}); fix or "
                              "remove that line") from None
    return rows


def _read_file(file: Path) -> list[dict]:
    try:
        if file.suffix == ".csv":
            with open(file, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(file).to_pylist()
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)  # a JSON list (HealthCareMagic-100k.json)
        if file.suffix == ".json" and text.lstrip().startswith('{"data"'):
            return json.loads(text)["data"]
        return _json_lines(file, text)
    except (ValueError, csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse {file}: {e}; expected the formats listed in hsd_exp/data/loaders.py") from e
