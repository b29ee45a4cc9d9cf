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
- the original releases (``hsd_exp/data/releases.py`` has the table): E2E's csv files, CommonGen's jsonl,
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

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hsd_exp.data.files import read_local, resolve_path, sample_dir, split_file
from hsd_exp.data.hub import load_hub
from hsd_exp.errors import ConfigError


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
    check_required(cfg)
    own_split = cfg.get("split") or "test"
    split = split if split is not None else own_split
    if limit is None and split == own_split:
        limit = cfg.get("limit")
        check_limit(limit)
    elif limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r}: expected an integer >= 0 or None")  # a caller's bug, not user input

    table = _load_table(cfg, split)
    if len(table) == 0:
        where = f"dataset.path={cfg.get('path')}" if cfg.get("path") else f"Hub dataset {cfg.get('hub_id')!r}"
        raise ConfigError(f"split {split!r} of {where} holds no rows: point dataset.path at files with data "
                          "(or choose another dataset.split)")
    examples = _to_examples(table, cfg, limit)
    if examples and not any(ex.references for ex in examples):
        raise ConfigError(
            f"dataset {cfg.get('name')!r} split {split!r} has no references (all targets are empty; "
            f"CommonGen's Hub test split hides them): use dataset.split=validation, or "
            f"dataset.path=DIR with a referenced {split}.jsonl"
        )
    return examples


def check_limit(limit: Any) -> None:
    """``dataset.limit``: a positive integer or null (0 would score nothing and still write a metrics.json)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"dataset.limit={limit!r} must be a positive integer (the first N inputs of "
                          f"dataset.split) or null for all of them")


REQUIRED = ("path", "source_field", "target_field", "instruction", "separator")


def check_required(cfg: dict) -> None:
    """``dataset=custom`` leaves what only the user knows as ``???``: name every one of them at once."""
    missing = [k for k in REQUIRED if cfg.get(k) == "???"]
    if missing:
        sets = " ".join(f"dataset.{k}=..." for k in missing)
        raise ConfigError(f"dataset {cfg.get('name')!r} needs {', '.join(f'dataset.{k}' for k in missing)}: set "
                          f"{sets} (the README's \"Your own model and data\" has a complete command)")


# -----------------------------------------------------------------------------
# rows -> examples


def _to_examples(table: Any, cfg: dict, limit: int | None) -> list[Example]:
    """Group rows (if ``group_by``), take the first ``limit`` groups, build `Example`s."""
    src_key, tgt_key = cfg.get("source_field"), cfg.get("target_field")
    id_key, group_key = cfg.get("id_field"), cfg.get("group_by")
    columns = _columns(table)
    absent = [(f, cfg.get(f)) for f in ("source_field", "target_field", "id_field", "group_by")
              if cfg.get(f) is not None and columns and cfg.get(f) not in columns]
    if absent:  # every missing column in one message, not one per run
        fixes = [f"dataset.{f}=null (no such column: one row per example)" if f in ("group_by", "id_field")
                 else f"dataset.{f}=<one of the columns>" for f, _ in absent]
        raise ConfigError(
            f"{', '.join(f'dataset.{f}={k!r}' for f, k in absent)} not among the columns of dataset "
            f"{cfg.get('name')!r} ({sorted(columns)}); set {', '.join(fixes)}"
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
        directory = resolve_path(cfg)
        if directory.is_dir() and fractions and all(split_file(directory, s) for s in fractions):
            return read_local(directory, split, cfg)  # already split on disk
        if fractions:
            return _derive_split(read_local(directory, cfg.get("split_source") or "train", cfg), split, cfg)
        return read_local(directory, split, cfg)
    if fractions:
        return _derive_split(load_hub(cfg, cfg.get("split_source") or "train", wanted=split), split, cfg)
    return load_hub(cfg, split)


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


__all__ = ["Example", "check_limit", "load_examples", "sample_dir", "split_indices"]
