"""Run folders: finding them and reading what each one ran and measured.

A run folder is what one evaluation (one Hydra job; see DEVELOPERS.md "Run directory format") leaves:

- ``.hydra/config.yaml``: the composed config (model, dataset, decode, policy), read raw: its interpolations
  are not resolved, since some use resolvers only the app registers;
- ``predictions.jsonl`` (``predictions.rank<N>.jsonl`` under DDP): one JSON line per example, streamed;
- ``metrics.json``: written when the run finishes; it says what ran, and the config fills in what it lacks.

Any folder holding one of these is a run. A ``task=compare`` run holds only the config, with one subfolder per
``compare_policies`` entry (named ``slug(policy.label)``); the subfolders are the runs and take model, dataset
and decode settings from the parent's config. A run without ``metrics.json`` (or with ``"complete": false``)
is half-finished: its status says ``partial (N predictions)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsd_exp.errors import ConfigError
from hsd_exp.eval.predictions import METRICS_FILE, PREDICTIONS_FILE
from hsd_exp.skip.policies import config_label

QUALITY_KEYS = ("rouge1", "rouge2", "rougeL", "bleu1", "bertscore_f1")
METRIC_FIELDS = (*QUALITY_KEYS, "bertscore_model", "avg_layers", "tokens_per_s", "num_examples", "num_layers")
FAMILY_ORDER = {"full": 0, "calm": 1, "skipdecode": 2, "hsd": 3}
CONFIG_FILE = Path(".hydra") / "config.yaml"

NO_RUNS = ("no runs found under {dir}: expected folders with .hydra/config.yaml or metrics.json "
           "(a multirun dir of `python -m hsd_exp -m ...`)")


# -----------------------------------------------------------------------------
# Run folders


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
    policy_label: str | None = None  # metrics.json's label (else the config policy's), e.g. "hsd(s=1,0,18)"
    s: Any = None
    min: Any = None
    max: Any = None
    d: Any = None
    criterion: Any = None
    num_beams: Any = None
    ckpt_path: Any = None
    model_path: Any = None  # model.path: a local copy or fine-tuned weights under the same model.name
    split: Any = None
    limit: Any = None
    do_sample: Any = None
    max_new_tokens: Any = None
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
        """The paper's row name: "Full", "CALM (d=0.02)", "SkipDecode (10,20)", "HSD (s=1, 0, 18)"; options
        beyond the paper's parameters follow them: "HSD (s=1, 0, 18, keep_first=2)"."""
        return method_label(self.policy, self.s, self.min, self.max, self.d, self.criterion, self.policy_label,
                            extra=label_extras(self.policy_label))

    @property
    def family(self) -> str:
        """Plot line / sort group: "Full", "CALM", "SkipDecode", "HSD s=1", "HSD s=2", "HSD s=1 (keep_first=2)"."""
        return family_label(self.policy, self.s, self.criterion, self.policy_label,
                            extra=label_extras(self.policy_label))

    @property
    def setting(self) -> tuple[str, ...]:
        """What a Full baseline must share besides (model.name, dataset.name): one text per SETTING_FIELDS.
        Two runs of one model name can still differ in weights (model.path, ckpt_path), inputs (split, limit)
        or decoding (beams, sampling, length); each such setting gets its own baseline, rows and lines."""
        return tuple(as_text(getattr(self, attr)) for attr, _ in SETTING_FIELDS)


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
               ("ckpt_path", "ckpt_path"), ("model_path", "model.path"), ("split", "dataset.split"),
               ("limit", "dataset.limit"), ("do_sample", "decode.do_sample"),
               ("max_new_tokens", "decode.max_new_tokens"))
# RunRecord.setting: (attribute, short name shown in a row's "[...]" suffix when settings differ), in that order.
SETTING_FIELDS = (("model_path", "model.path"), ("ckpt_path", "ckpt"), ("split", "split"), ("limit", "limit"),
                  ("num_beams", "beams"), ("do_sample", "sample"), ("max_new_tokens", "max_new_tokens"))
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
        record.policy_label = config_label(record.config.get("policy"))  # metrics.json's label, if any, wins
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


def _policy_params(policy: dict) -> dict:
    return {k: v for k, v in policy.items() if k not in ("_target_", "name")}


def _apply_compare_policy(record: RunRecord, entries: Any, folder: str) -> None:
    """The ``compare_policies`` entry whose label slug names ``folder`` (how task=compare names them)."""
    for entry in entries if isinstance(entries, list) else []:
        label = config_label(entry)
        if label is not None and slug(label) == folder:
            record.policy, record.policy_label = entry["name"], label
            _set_params(record, _policy_params(entry))
            return
    record.policy_label = folder  # unknown policy: at least name the row after its folder


def slug(label: str) -> str:
    """A policy label as a folder name: task=compare runs each policy in ``out_dir / slug(policy.label)``."""
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
    # The rest of the setting comes from the config alone, so a run that has not written metrics.json yet
    # (whose setting only its config knows) gets the same setting as its finished siblings; metrics.json's
    # values serve only a run without a config.
    if not record.config:
        for key in ("model_path", "split", "limit", "do_sample", "max_new_tokens"):
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


_LABEL_RE = (  # Policy.label formats (hsd_exp/policies.py); "extra" = options beyond the paper's parameters
    re.compile(r"hsd\(s=(?P<s>[^,]+),(?P<min>[^,]+),(?P<max>[^,)]+)(?:,(?P<extra>.+))?\)"),
    re.compile(r"skipdecode\((?P<min>[^,]+),(?P<max>[^,)]+)(?:,(?P<extra>.+))?\)"),
    re.compile(r"calm\(d=(?P<d>[^,)]+)(?:,(?P<criterion>[^,)=]+))?(?:,(?P<extra>.+))?\)"),
)


def _match_label(label: str) -> dict:
    for pattern in _LABEL_RE:
        m = pattern.fullmatch(label.strip())
        if m:
            return {k: v for k, v in m.groupdict().items() if v is not None}
    return {}


def parse_policy_label(label: str) -> dict:
    """Parameters from a ``Policy.label`` ("hsd(s=1,0,18)" -> {"s": 1, "min": 0, "max": 18}); {} if unknown."""
    return {k: _number(v) for k, v in _match_label(label).items() if k != "extra"}


def label_extras(label: str | None) -> str | None:
    """The options a label shows beyond the paper's parameters ("hsd(s=1,0,18,keep_first=2)" -> "keep_first=2")."""
    return _match_label(label).get("extra") if label else None


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


def policy_name(policy: str | None, label: str | None) -> str:
    """``policy.name``, else the name its label starts with ("hsd(s=1,0,18)" -> "hsd"); "?" if neither."""
    if policy:
        return str(policy)
    return re.split(r"[(\s]", label or "", maxsplit=1)[0] or "?"


def method_label(policy, s=None, lo=None, hi=None, d=None, criterion=None, fallback=None, extra=None) -> str:
    """The paper's row names. CALM names its criterion only when it is not the paper's softmax; options beyond
    the paper's parameters (``extra``, e.g. "keep_first=2") follow them, so variants never share a row name."""
    name = policy_name(policy, fallback)
    p = _fmt_param
    more = f", {extra.replace(',', ', ')}" if extra else ""
    if name == "full":
        return "Full"
    if name == "calm" and d is not None:
        crit = "" if criterion in (None, "softmax") else f", {criterion}"
        return f"CALM (d={p(d)}{crit}{more})"
    if name == "skipdecode" and lo is not None and hi is not None:
        return f"SkipDecode ({p(lo)},{p(hi)}{more})"
    if name == "hsd" and s is not None and lo is not None and hi is not None:
        return f"HSD (s={p(s)}, {p(lo)}, {p(hi)}{more})"
    return fallback or name


def family_label(policy, s=None, criterion=None, fallback=None, extra=None) -> str:
    """One plot line per method family; a variant (``extra``) gets its own line."""
    name = policy_name(policy, fallback)
    if name == "hsd":
        family = f"HSD s={_fmt_param(s)}" if s is not None else "HSD"
    elif name == "calm":
        family = "CALM" if criterion in (None, "softmax") else f"CALM ({criterion})"
    else:
        family = {"full": "Full", "skipdecode": "SkipDecode"}.get(name, name)
    return f"{family} ({extra.replace(',', ', ')})" if extra and name != "full" else family


def flat_config(d: dict, prefix: str = "") -> dict:
    """Dotted keys: W&B's run comparer and parallel-coordinates panels want flat configs."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list) else str(v)
    return out


def resolved_config(record: RunRecord) -> dict:
    """The run's .hydra/config.yaml with its interpolations resolved where they resolve (Hydra's own
    resolvers, such as ``now``, do not outside a Hydra run: then the raw values)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(record.config), resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: keep the file's text
        return record.config


def as_text(value: Any) -> str:
    """None as "", anything else as ``str``: config and metrics values compared or shown as text."""
    return "" if value is None else str(value)


def is_number(x: Any) -> bool:
    """A finite int or float (metrics.json values are kept as they are: they may be missing or text)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def group_key(run: RunRecord) -> tuple[str, str]:
    """(model, dataset): a report has one table (and figure panel) per group."""
    return (as_text(run.model) or "?", as_text(run.dataset) or "?")
