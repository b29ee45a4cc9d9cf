"""Dataset loaders: one `conf/dataset/*.yaml` -> a list of `Example(id, source, references)`.

Where the rows come from (first that applies):
1. ``dataset.path`` set -> local files in that directory (or that one file). ``path: sample`` means the
   small bundled sample ``hsd_exp/samples/<name>/`` (E2E and CommonGen only).
2. otherwise the Hub id via ``datasets.load_dataset(hub_id, hub_config, split=...)`` -- online, or from
   the local Hugging Face cache. When the Hub is unreachable (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
   set, or a 3 s connection probe fails) only the cache is tried, so an offline run fails in
   milliseconds instead of retrying for minutes.

Local file formats (rows are normalised to the Hub schema of the yaml's ``hub_id``):
- ``{split}.jsonl`` / ``{split}.json`` / ``{split}.csv`` / ``{split}.parquet`` in Hub schema
  (the format of ``../shared/data``; CNN/DM's ``{train,validation,test}.csv``; XSum's files);
- the original releases (``hsd_exp/releases.py`` has the table): E2E's csv files, CommonGen's jsonl,
  HealthCareMagic-100k.json (it is the Hub's train split), XSum's ``bbc-summary-data/`` + split json,
  CNN/DailyMail's ``.story`` files + url lists, and ``{split}.source`` / ``{split}.target`` line files.
  The split name ``validation`` also matches files called ``dev`` / ``val`` / ``valid``.
Plain-text files are parsed with the standard library: a local run never writes to the HF cache.

Multi-reference datasets (E2E, CommonGen) have one row per reference: rows are grouped by
``group_by`` in order of first appearance, ``references`` = the group's non-empty targets.
``limit`` keeps the first N examples after grouping (deterministic). Ids: ``id_field`` of the (first)
row when set, else the first 12 hex digits of sha1(group key) when grouping, else the row index.

HealthCareMagic-100k only has a train split: when ``split_fractions`` is set (e.g. 0.9/0.05/0.05) the
splits are derived from ``split_source`` (train) by a seeded, platform-independent permutation: rows
are sorted by sha256("{split_seed}:{row index}") and cut in that order into consecutive blocks of
round(fraction * N) rows; each split keeps its rows in original order. A local directory that already
has a file for every split in ``split_fractions`` is used as is.

The fine-tuning datamodule flattens multi-reference examples into one (source, reference) pair each.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
HUB_PROBE_TIMEOUT_S = 3.0

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Example:
    id: str
    source: str
    references: list[str]


# -----------------------------------------------------------------------------
# public API


def load_examples(dataset_cfg: Any, split: str | None = None, limit: int | None = None) -> list[Example]:
    """Load one split of a dataset as `Example`s. ``split`` defaults to ``dataset.split``.

    ``limit`` defaults to ``dataset.limit`` only for that split: dataset.limit picks the evaluation subset, and
    must not cut training data as well (``finetune.train_limit`` / ``val_limit`` do that).
    """
    cfg = _as_dict(dataset_cfg)
    own_split = cfg.get("split") or "test"
    split = split if split is not None else own_split
    if limit is None and split == own_split:
        limit = cfg.get("limit")
    check_limit(limit)

    table = _load_table(cfg, split)
    examples = _to_examples(table, cfg, limit)
    if examples and not any(ex.references for ex in examples):
        raise ConfigError(
            f"dataset {cfg.get('name')!r} split {split!r} has no references (all targets are empty; "
            f"CommonGen's Hub test split hides them): use dataset.split=validation, or "
            f"dataset.path=DIR with a referenced {split}.jsonl"
        )
    return examples


def check_limit(limit: Any) -> None:
    """``dataset.limit``: a non-negative integer or null."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"dataset.limit={limit!r} must be a non-negative integer (the first N inputs of "
                          f"dataset.split) or null for all of them")


def sample_dir(name: str) -> Path:
    """The bundled sample of dataset ``name`` (``dataset.path=sample``)."""
    return SAMPLES_DIR / name


# -----------------------------------------------------------------------------
# rows -> examples


def _to_examples(table: Any, cfg: dict, limit: int | None) -> list[Example]:
    """Group rows (if ``group_by``), take the first ``limit`` groups, build `Example`s."""
    src_key, tgt_key = cfg.get("source_field"), cfg.get("target_field")
    id_key, group_key = cfg.get("id_field"), cfg.get("group_by")
    columns = _columns(table)
    for field in ("source_field", "target_field", "id_field", "group_by"):
        key = cfg.get(field)
        if key is not None and columns and key not in columns:
            raise ConfigError(
                f"dataset.{field}={key!r} is not a column of dataset {cfg.get('name')!r} "
                f"(columns: {sorted(columns)}); set dataset.{field}=<one of them>"
            )
    if src_key is None or tgt_key is None:
        raise ConfigError("dataset.source_field and dataset.target_field must be set")

    # groups: list of (key, row indices) in order of first appearance
    n = len(table)
    if group_key is None:
        groups = [(i, [i]) for i in range(n if limit is None else min(limit, n))]
    else:
        index: dict[Any, list[int]] = {}
        for i, key in enumerate(_column(table, group_key)):
            index.setdefault(_hashable(key), []).append(i)
        groups = list(index.items())[:limit]

    wanted = [i for _, rows in groups for i in rows]
    rows = dict(zip(wanted, _rows(table, wanted), strict=True))
    join = cfg.get("source_join") or ", "
    examples, seen = [], set()
    for key, members in groups:
        first = rows[members[0]]
        if id_key is not None:
            ex_id = str(first[id_key])
        elif group_key is not None:
            ex_id = hashlib.sha1(str(key).encode()).hexdigest()[:12]
        else:
            ex_id = str(first.get("_index", key))
        ex_id = _unique(ex_id, seen)
        refs = [ref for i in members for ref in _texts(rows[i][tgt_key])]
        examples.append(Example(id=ex_id, source=_source_text(first[src_key], join), references=refs))
    return examples


def _source_text(value: Any, join: str) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return join.join(str(v) for v in value)
    return str(value)


def _texts(value: Any) -> list[str]:
    """A target cell -> its non-empty reference strings (a cell may hold a list of references)."""
    values = value if isinstance(value, list | tuple) else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _unique(ex_id: str, seen: set[str]) -> str:
    base, k = ex_id, 1
    while ex_id in seen:  # duplicated ids would break resume (done_ids)
        k += 1
        ex_id = f"{base}#{k}"
    seen.add(ex_id)
    return ex_id


# tables are either a list of row dicts (local files) or a `datasets.Dataset` (Hub)
def _columns(table: Any) -> set[str]:
    if isinstance(table, list):
        return set(table[0]) - {"_index"} if table else set()
    return set(table.column_names) - {"_index"}


def _column(table: Any, key: str) -> list[Any]:
    if isinstance(table, list):
        return [row.get(key) for row in table]
    return table[key]


def _rows(table: Any, indices: list[int]) -> Iterator[dict]:
    if isinstance(table, list):
        return (table[i] for i in indices)
    return iter(table.select(indices))


# -----------------------------------------------------------------------------
# split resolution (incl. derived splits for datasets that only ship a train split)


def _load_table(cfg: dict, split: str) -> Any:
    fractions = cfg.get("split_fractions")
    if fractions and split not in fractions:
        raise ConfigError(
            f"dataset.split={split!r} does not exist for dataset {cfg.get('name')!r}; "
            f"splits: {sorted(fractions)} (derived from its {cfg.get('split_source') or 'train'} split)"
        )
    if cfg.get("path") is not None:
        directory = _resolve_path(cfg)
        if directory.is_dir() and fractions and all(_split_file(directory, s) for s in fractions):
            return _read_local(directory, split, cfg)  # already split on disk
        if fractions:
            return _derive_split(_read_local(directory, cfg.get("split_source") or "train", cfg), split, cfg)
        return _read_local(directory, split, cfg)
    if fractions:
        return _derive_split(_load_hub(cfg, cfg.get("split_source") or "train", wanted=split), split, cfg)
    return _load_hub(cfg, split)


def split_indices(n: int, fractions: Mapping[str, float], seed: int = 0) -> dict[str, list[int]]:
    """Deterministic split of row indices 0..n-1: order by sha256(f"{seed}:{i}"), cut into blocks.

    Block sizes are round(fraction * n) in the order of ``fractions``; the last block takes the rest.
    Each split's indices are returned sorted (original order).
    """
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    out, start, names = {}, 0, list(fractions)
    for k, name in enumerate(names):
        stop = n if k == len(names) - 1 else min(n, start + round(float(fractions[name]) * n))
        out[name] = sorted(order[start:stop])
        start = stop
    return out


def _derive_split(table: Any, split: str, cfg: dict) -> Any:
    indices = split_indices(len(table), cfg["split_fractions"], int(cfg.get("split_seed") or 0))[split]
    if isinstance(table, list):
        return [table[i] for i in indices]
    # a Hub Dataset: keep the original row index as the default id
    return table.add_column("_index", list(range(len(table)))).select(indices)


# -----------------------------------------------------------------------------
# local files


def _resolve_path(cfg: dict) -> Path:
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


def _split_file(directory: Path, split: str) -> Path | None:
    for stem in [split, *SPLIT_ALIASES.get(split, [])]:
        for ext in EXTENSIONS:
            if (directory / f"{stem}{ext}").is_file():
                return directory / f"{stem}{ext}"
    for name in ORIGINAL_FILES.get(split, []):
        if (directory / name).is_file():
            return directory / name
    return None


def _existing_splits(directory: Path) -> list[str]:
    found = {s for s in ("train", "validation", "test") if _split_file(directory, s)} | release_splits(directory)
    known = {name for names in ORIGINAL_FILES.values() for name in names}
    aliases = {a for names in SPLIT_ALIASES.values() for a in names}
    found |= {p.stem for p in directory.iterdir() if p.suffix in EXTENSIONS and p.name not in known}
    return sorted(found - aliases)


def _read_local(path: Path, split: str, cfg: dict) -> list[dict]:
    """Rows of one split from a directory (or from ``path`` itself when it is a file)."""
    if path.is_file():
        rows = normalise(_read_file(path))
    elif (file := _split_file(path, split)) is not None:
        rows = normalise(_read_file(file))
    else:
        rows = read_release_dir(path, split, cfg)
        if rows is None:
            raise ConfigError(
                f"split {split!r} not found in dataset.path={str(path)!r}: it has the splits "
                f"{_existing_splits(path)}; set dataset.split=<one of them>"
            )
    for i, row in enumerate(rows):
        row.setdefault("_index", i)
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
        return [json.loads(line) for line in text_lines(text) if line.strip()]
    except (ValueError, csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse {file}: {e}; expected the formats listed in hsd_exp/data.py") from e


# -----------------------------------------------------------------------------
# the Hub


def hub_reachable() -> bool:
    """False when offline mode is set or huggingface.co:443 does not answer within 3 s."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may be the only way out: let the client try
    host = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """Make `datasets` / `huggingface_hub` cache-only for one call (their flags are read at import)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _load_hub(cfg: dict, split: str, wanted: str | None = None) -> Any:
    """Hub split ``split``; ``wanted``: the split derived from it (HealthCareMagic), for the error message."""
    hub_id, hub_config = cfg.get("hub_id"), cfg.get("hub_config")
    name = cfg.get("name")
    if not hub_id:
        raise ConfigError(
            f"dataset {name!r} has neither dataset.path nor dataset.hub_id; set dataset.path=DIR"
        )
    import datasets

    offline = not hub_reachable()
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(hub_id, hub_config, split=split)
    except ValueError as e:
        if "split" in str(e).lower() and "unknown" in str(e).lower():
            raise ConfigError(
                f"split {split!r} not found in Hub dataset {hub_id!r}: {e}; set dataset.split=<one of them>"
            ) from e
        raise ConfigError(_hub_error(cfg, split, offline, e, wanted)) from e
    except Exception as e:  # connection errors, missing repo, missing cache entry
        raise ConfigError(_hub_error(cfg, split, offline, e, wanted)) from e


def _hub_error(cfg: dict, split: str, offline: bool, err: Exception, wanted: str | None = None) -> str:
    hub = cfg.get("hub_id") + (f" ({cfg.get('hub_config')})" if cfg.get("hub_config") else "")
    why = "the Hub is unreachable (offline) and it is not in the local cache" if offline else f"{err}"
    which = f"split {wanted!r} (derived from the Hub's {split!r} split)" if wanted and wanted != split else \
        f"split {split!r}"
    return (
        f"cannot load dataset {cfg.get('name')!r} {which}: tried dataset.path (null) and Hub id "
        f"{hub}: {why}. Set dataset.path=DIR to a folder with {wanted or split}.jsonl (Hub schema) or the "
        f"original release files, or run once online to cache it"
    )


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, dict):
        return dict(cfg)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"dataset config must be a mapping, got {type(cfg).__name__}")


__all__ = ["Example", "load_examples", "sample_dir", "split_indices", "hub_reachable", "SAMPLES_DIR"]
