"""Run folders read back: what each one ran and measured, as one RunRecord.

A run folder is what one evaluation (one Hydra job; ``hsd_exp.run_folder``, DEVELOPERS.md "Run directory format")
leaves:

- ``.hydra/config.yaml``: the composed config (model, dataset, decode, policy), read raw: its interpolations
  are not resolved, since some use resolvers only the app registers;
- ``predictions.jsonl`` (``predictions.rank<N>.jsonl`` under DDP): one JSON line per example, streamed;
- ``metrics.json``: written when the run finishes; it says what ran, and the config fills in what it lacks.

Any folder holding one of these is a run. A ``task=compare`` run holds only the config, with one subfolder per
``compare_policies`` entry (named ``slug(policy.label)``); the subfolders are the runs and take model, dataset
and decode settings from the parent's config. A run without ``metrics.json`` (or with ``"complete": false``)
is half-finished: its status says ``partial (N predictions)``.

What a run's row is called, where it sorts and how it is drawn, its policy says: the report rebuilds the
Policy from the recorded name and parameters (metrics.json's ``policy_params``, else the config's policy node
or the ``compare_policies`` entry) and asks it. A policy that cannot be rebuilt (unknown name, bad parameters,
or one whose label differs from the recorded one) leaves the row named after its label or folder.
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
from hsd_exp.eval.metrics import QUALITY_KEYS
from hsd_exp.report.folders import count_predictions, find_run_dirs
from hsd_exp.run_folder import CONFIG_FILE, MEASURED, METRICS_FILE, PAIRED, SETTING, slug
from hsd_exp.skip.policies import Policy, build_policy, config_label, policy_class

# RunRecord.setting: (attribute, short name shown in a row's "[...]" suffix when settings differ), in that order.
SETTING_FIELDS = tuple((f.name, f.short) for f in PAIRED)

NO_RUNS = ("no runs found under {dir}: expected folders with .hydra/config.yaml or metrics.json "
           "(a multirun dir of `python -m hsd_exp -m ...`)")


@dataclass
class RunRecord:
    """One evaluation run: what its config says it ran and what its metrics.json measured (None = missing). One
    attribute per ``run_folder.SETTING`` field and ``run_folder.MEASURED`` / quality key, of the same name."""

    path: Path
    status: str  # "complete", "partial (N predictions)" or "unreadable: ..."
    complete: bool = False
    num_predictions: int | None = None
    model: str | None = None
    dataset: str | None = None
    policy: str | None = None  # policy.name, e.g. "hsd"
    policy_label: str | None = None  # metrics.json's label (else the config policy's), e.g. "hsd(s=1,0,18)"
    params: dict = field(default_factory=dict)  # the policy's parameters as recorded, e.g. {"s": 1, "min": 0, ...}
    num_beams: Any = None
    ckpt_path: Any = None
    model_path: Any = None  # model.path: a local copy or fine-tuned weights under the same model.name
    adapter: Any = None  # model.adapter: a LoRA adapter merged into the weights (hsd_exp.models.shipped)
    split: Any = None
    limit: Any = None
    do_sample: Any = None
    max_new_tokens: Any = None
    temperature: Any = None  # sampling only: greedy and beam search ignore it
    top_p: Any = None
    dataset_path: Any = None  # dataset.path: another dataset under the same dataset.name
    chat: Any = None  # model.chat: the prompt format (chat template or instruction + separator)
    instruction: Any = None
    separator: Any = None
    max_source_tokens: Any = None
    examples_hash: Any = None  # metrics.json: the scored examples' identity (ids, sources, references)
    rouge1: Any = None
    rouge2: Any = None
    rougeL: Any = None
    bleu1: Any = None
    bertscore_f1: Any = None
    bertscore_model: Any = None
    avg_layers: Any = None
    tokens_per_s: Any = None  # tokens up to EOS per second: output-length dependent, not the Speedup's measure
    ms_per_step: Any = None  # one decode step of the batch (prefill apart): the Speedup's measure
    prefill_ms: Any = None
    flop_ideal: Any = None  # the speedup its layers allow (hsd_exp.eval.speed.flop_ideal)
    mean_new_tokens: Any = None  # tokens generated per example, up to EOS
    num_examples: Any = None
    num_layers: Any = None
    lossless: Any = None  # decode=lossless: the policy drafted, the full model verified (quality = full's)
    draft_len: Any = None
    draft_confidence: Any = None  # lossless: the adaptive draft length's threshold (None: always draft_len)
    acceptance: Any = None
    tokens_per_verification: Any = None
    layer_forwards_per_token: Any = None  # lossless: decoder-layer forwards (drafts + verifications) per token
    config: dict = field(default_factory=dict, repr=False)  # raw (unresolved) .hydra/config.yaml
    built: Policy | None = field(default=None, repr=False)  # the policy rebuilt from (policy, params), if it can be

    @property
    def method(self) -> str:
        """The row name (``Policy.display_name``, e.g. "HSD (s=1, 0, 18)"), else the label or folder name."""
        name = self.built.display_name if self.built else self.policy_label or policy_name(self.policy, None)
        if self.lossless:  # the policy only drafted: name the mode and what its drafts achieved
            accepted = f", acceptance {self.acceptance:.2f}" if is_number(self.acceptance) else ""
            conf = f", c={self.draft_confidence:g}" if is_number(self.draft_confidence) else ""
            name += f" → lossless (k={self.draft_len}{conf}{accepted})"
        return name

    @property
    def batch_size(self) -> Any:
        """decode.batch_size from the run's config (None without one): a step's time depends on it."""
        decode = self.config.get("decode") if isinstance(self.config, dict) else None
        return decode.get("batch_size") if isinstance(decode, dict) else None

    @property
    def plot_line(self) -> str:
        """Plot line / sort group (``Policy.plot_line``, e.g. "HSD s=1"), else the policy class's title or name."""
        if self.lossless:
            return "Lossless"
        if self.built:
            return self.built.plot_line
        cls = self.policy_class
        return cls.title if cls else policy_name(self.policy, self.policy_label)

    @property
    def policy_class(self) -> type[Policy] | None:
        return type(self.built) if self.built else policy_class(policy_name(self.policy, self.policy_label))

    @property
    def order(self) -> int:
        """The family's place among the others (``Policy.order``; Full first)."""
        return (self.policy_class or Policy).order

    @property
    def is_baseline(self) -> bool:
        """A full-decoding run: the Speedup and % of full reference of its setting."""
        return bool(self.policy_class and self.policy_class.baseline) and not self.lossless

    @property
    def setting(self) -> tuple[str, ...]:
        """What a Full baseline must share besides (model.name, dataset.name): one text per SETTING_FIELDS.
        Two runs of one model name can still differ in weights (model.path, ckpt_path), inputs (split, limit,
        dataset.path), prompt format (model.chat, instruction, separator, max_source_tokens) or decoding (beams,
        sampling, length; temperature and top_p when sampling); each such setting gets its own baseline, rows
        and lines. Which examples were scored (``examples_hash``) is checked apart: ``same_examples``."""
        sampling = str(self.do_sample).lower() == "true"
        return tuple("" if f.sampling_only and not sampling else as_text(getattr(self, f.name)) for f in PAIRED)


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
    record.built = rebuild_policy(record.policy, record.params, record.policy_label)
    # metrics.json is written when a run finishes; only an explicit "complete": false says otherwise.
    record.complete = metrics is not None and metrics.get("complete", True) is not False
    record.num_predictions = count_predictions(run_dir)
    if not record.complete:
        record.status = f"partial ({record.num_predictions} predictions)"
    if problems:
        record.status = "; ".join([record.status, *problems])
    return record


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
    for f in SETTING:
        setattr(record, f.name, _config_value(cfg, record.config, f.config))
    if path == own:
        record.policy = _config_value(cfg, record.config, "policy.name")
        node = record.config.get("policy")
        record.params = _policy_params({k: _config_value(cfg, record.config, f"policy.{k}")
                                        for k in (node if isinstance(node, dict) else {})})
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
    """A policy node's parameters: everything but ``_target_`` and ``name``; a None value counts as unknown."""
    return {k: v for k, v in policy.items() if k not in ("_target_", "name") and v is not None}


def rebuild_policy(name: Any, params: dict, label: str | None = None) -> Policy | None:
    """The Policy a run recorded, or None: unknown name, invalid parameters, or a rebuilt label that is not
    the recorded ``label`` (the parameters do not say what ran, e.g. metrics.json without policy_params)."""
    if policy_class(name) is None:
        return None
    try:
        policy = build_policy(name, **params)
    except Exception:  # a raw "${...}" or a mistyped value: the row keeps its label
        return None
    return policy if label is None or policy.label == label else None


def _apply_compare_policy(record: RunRecord, entries: Any, folder: str) -> None:
    """The ``compare_policies`` entry whose label slug names ``folder`` (how task=compare names them)."""
    for entry in entries if isinstance(entries, list) else []:
        label = config_label(entry)
        if label is not None and slug(label) == folder:
            record.policy, record.policy_label = entry["name"], label
            record.params = _policy_params(entry)
            return
    record.policy_label = folder  # unknown policy: at least name the row after its folder


def _load_metrics(path: Path) -> dict | None:
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} is not a JSON object")
    return metrics


def _apply_metrics(record: RunRecord, metrics: dict) -> None:
    """metrics.json values as they are; what it says ran (the policy, ``SettingField.wins == "ran"``) wins over
    the config."""
    for key in (*QUALITY_KEYS, *MEASURED):
        setattr(record, key, metrics.get(key))
    for key in ("policy", "policy_label", *(f.name for f in SETTING if f.wins == "ran")):
        if metrics.get(key) is not None:
            setattr(record, key, metrics[key])
    # The rest of the setting comes from the config, so a run that has not written metrics.json yet (whose
    # setting only its config knows) gets the same setting as its finished siblings; metrics.json's values
    # serve a run without a config, and its "limit" (wins == "scored") always.
    for f in SETTING:
        if (f.wins == "scored" or (f.wins == "config" and not record.config)) and f.name in metrics:
            setattr(record, f.name, metrics[f.name])  # a recorded null is a value (dataset.limit=null: all)
    record.examples_hash = metrics.get("examples_hash")
    if isinstance(metrics.get("policy_params"), dict):  # all of the policy's parameters, as it ran
        record.params = _policy_params(metrics["policy_params"])


def policy_name(policy: str | None, label: str | None) -> str:
    """``policy.name``, else the name its label starts with ("hsd(s=1,0,18)" -> "hsd"); "?" if neither."""
    if policy:
        return str(policy)
    return re.split(r"[(\s]", label or "", maxsplit=1)[0] or "?"


def as_text(value: Any) -> str:
    """None as "", anything else as ``str``: config and metrics values compared or shown as text."""
    return "" if value is None else str(value)


def is_number(x: Any) -> bool:
    """A finite int or float (metrics.json values are kept as they are: they may be missing or text)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def group_key(run: RunRecord) -> tuple[str, str]:
    """(model, dataset): a report has one table (and figure panel) per group."""
    return (as_text(run.model) or "?", as_text(run.dataset) or "?")
