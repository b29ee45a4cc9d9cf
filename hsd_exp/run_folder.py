"""The run folder: what one evaluation (one Hydra job) writes, and the one list of fields that make its setting.

Producers (``tasks.evaluate``, the evaluation callbacks, ``trainer``) write through these names; readers (resume,
``python -m hsd_exp.report``) read through them. DEVELOPERS.md "Run directory format" describes the files::

    <run>/.hydra/config.yaml           Hydra's composed config
    <run>/run.json                     resume_key: the setting its predictions belong to (written first)
    <run>/predictions.jsonl            one JSON line per example (predictions.rank<N>.jsonl per DDP rank)
    <run>/metrics.json                 scores + recorded_setting (written last: the run is finished)
    <run>/layer_run_rates.{json,png}   a per-token policy's layer map (hsd_exp.eval.layer_map)
    <run>/report.{md,csv}, quality_vs_layers.png   where the report (or task=compare) writes into it
    <compare run>/<slug(policy.label)>/            task=compare: one run folder per policy

A run's *setting* is everything its predictions depend on besides the policy: ``SETTING``. Three views of it:
``resume_key`` (run.json: a resume with another one is refused), ``recorded_setting`` (metrics.json: what the
report pairs runs on) and, in the report, ``RunRecord.setting`` (the fields with a ``short`` name).

No torch, no report: the report, preflight and the Hydra resolvers import this module cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = Path(".hydra") / "config.yaml"
RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
RATES_FILE, RATES_PLOT = "layer_run_rates.json", "layer_run_rates.png"
REPORT_FILES = {"md": "report.md", "csv": "report.csv", "png": "quality_vs_layers.png"}


def predictions_file(rank: int = 0, world_size: int = 1) -> str:
    """This rank's predictions file: ``predictions.jsonl``, or ``predictions.rank<N>.jsonl`` under DDP (one writer
    per file; readers merge them, each id once)."""
    return PREDICTIONS_FILE if world_size == 1 else f"predictions.rank{rank}.jsonl"


def is_predictions_file(name: str) -> bool:
    """``predictions.jsonl`` or a DDP rank's ``predictions.rank<N>.jsonl``."""
    stem, suffix = PREDICTIONS_FILE.rsplit(".", 1)
    return name.startswith(stem) and name.endswith("." + suffix)


def slug(label: str) -> str:
    """A policy label as a folder name: task=compare runs each policy in ``out_dir / slug(policy.label)``, and a
    multirun job's folder is ``<job number>_<slug>`` (``${hsd_policy_slug:...}``): "hsd(s=1,0,18)" -> "hsd_s_1_0_18"."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in label).strip("_")


@dataclass(frozen=True)
class SettingField:
    """One value a run's predictions depend on.

    ``name`` is its metrics.json key, the report's RunRecord attribute and report.csv column; ``config`` its dotted
    key in .hydra/config.yaml; ``short`` how a report row names it when two settings differ ("[beams=1]"), None for
    model and dataset, which name the report's table instead. ``wins`` says which file the report believes when
    both hold it: "config" (metrics.json only for a run without a config), "ran" (metrics.json's when not null:
    what ran, the loaded model's name or the evaluated checkpoint) or "scored" (metrics.json's whenever it records
    one, null included: the limit its scored predictions were made under; a refused resume has already rewritten
    the config). ``resumes``: run.json holds it, so a resume with another value is refused (not ``dataset.limit``:
    a larger limit extends a run). ``path``: run.json records the resolved file, however the command spelled it.
    """

    name: str
    config: str
    short: str | None = None
    wins: str = "config"
    resumes: bool = False
    path: bool = False
    sampling_only: bool = False  # part of the pairing only where decode.do_sample is true

    @property
    def decoding(self) -> bool:
        """A ``decode`` key: run.json holds these inside its whole ``decode`` node (``decoding``)."""
        return self.config.startswith("decode.")


# In the order a report row names them when settings differ ("[model.path=..., beams=1]").
SETTING = (
    SettingField("model", "model.name", wins="ran", resumes=True),
    SettingField("dataset", "dataset.name", wins="ran", resumes=True),
    SettingField("model_path", "model.path", "model.path", resumes=True, path=True),
    SettingField("adapter", "model.adapter", "adapter", resumes=True),  # a LoRA adapter merged on load
    SettingField("ckpt_path", "ckpt_path", "ckpt", wins="ran", resumes=True, path=True),
    SettingField("split", "dataset.split", "split", resumes=True),
    SettingField("limit", "dataset.limit", "limit", wins="scored"),
    SettingField("num_beams", "decode.num_beams", "beams", wins="ran", resumes=True),
    SettingField("do_sample", "decode.do_sample", "sample", resumes=True),
    SettingField("max_new_tokens", "decode.max_new_tokens", "max_new_tokens", resumes=True),
    SettingField("dataset_path", "dataset.path", "data", resumes=True, path=True),
    # The prompt format (a run.json from before these fields lacks them: the resume adopts them, hsd_exp.eval.resume).
    SettingField("chat", "model.chat", "chat", resumes=True),
    SettingField("instruction", "dataset.instruction", "instruction", resumes=True),
    SettingField("separator", "dataset.separator", "separator", resumes=True),
    SettingField("max_source_tokens", "dataset.max_source_tokens", "max_source_tokens", resumes=True),
    SettingField("temperature", "decode.temperature", "temperature", resumes=True, sampling_only=True),
    SettingField("top_p", "decode.top_p", "top_p", resumes=True, sampling_only=True),
)
PAIRED = tuple(f for f in SETTING if f.short)  # what a Full baseline must share besides (model, dataset)

# What else metrics.json holds, besides the quality metrics (hsd_exp.eval.metrics.QUALITY_KEYS), the policy
# ("policy", "policy_label", "policy_params"), "examples_hash" and "complete": what the run measured.
# Speed (hsd_exp.eval.speed): ms_per_step (the report's Speedup), prefill_ms, tokens_per_s (output-length dependent),
# flop_ideal (the bound a Speedup must respect), mean_new_tokens (checked against Full's); a lossless run's
# layer_forwards_per_token (what its drafts and verifications ran per committed token).
MEASURED = ("bertscore_model", "avg_layers", "tokens_per_s", "ms_per_step", "prefill_ms", "flop_ideal",
            "mean_new_tokens", "num_examples", "num_layers", "lossless", "draft_len", "draft_confidence",
            "acceptance", "tokens_per_verification", "layer_forwards_per_token")

NOT_DECODING = ("_target_", "batch_size")  # decode keys that do not change a prediction


def setting_values(cfg: Any, **given: Any) -> dict:
    """{field name: value} for every SETTING field, as the config gives it, but ``given`` (the loaded model's
    ``model`` name and ``chat`` format, the evaluated ``ckpt_path``) over the config's."""
    from omegaconf import OmegaConf

    unknown = set(given) - {f.name for f in SETTING}
    if unknown:
        raise TypeError(f"setting_values: {sorted(unknown)} are not SETTING fields")
    return {f.name: given[f.name] if f.name in given else OmegaConf.select(cfg, f.config, default=None)
            for f in SETTING}


def decoding(cfg: Any) -> dict:
    """The ``decode`` node, resolved, without the keys that change no prediction (``NOT_DECODING``)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.decode, resolve=True)
    return {k: v for k, v in node.items() if k not in NOT_DECODING}


def resume_key(cfg: Any, policy_label: str, *, model: str, ckpt_path: str | None) -> dict:
    """run.json: what a run's predictions depend on, as a resume must find it again. The policy's label, the
    ``resumes`` fields (paths resolved) and the whole ``decode`` node but batch size."""
    values = setting_values(cfg, model=model, ckpt_path=ckpt_path)
    key = {"policy": policy_label}
    key.update({f.name: _where(values[f.name]) if f.path else values[f.name]
                for f in SETTING if f.resumes and not f.decoding})
    key["decode"] = decoding(cfg)
    return key


def recorded_setting(cfg: Any, policy: Any, *, model: str, chat: bool, num_layers: int,
                     ckpt_path: str | None) -> dict:
    """metrics.json's record of what ran: the policy (name, label, every parameter), the model's depth, and every
    SETTING field as the config gives it (``model``, ``chat``, ``ckpt_path``: as the run loaded them). The report
    pairs a run with the Full run that shares these (and its ``examples_hash``)."""
    return {"policy": policy.name, "policy_label": policy.label, "policy_params": policy.params(),
            "num_layers": num_layers, **setting_values(cfg, model=model, chat=chat, ckpt_path=ckpt_path)}


def flat_config(d: dict, prefix: str = "") -> dict:
    """Dotted keys ({"a": {"b": 1}} -> {"a.b": 1}), lists as text: W&B's run comparer and parallel-coordinates
    panels want flat configs."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list) else str(v)
    return out


def _where(path: Any) -> Any:
    """The same file however the command line spelled it (``sample``, the bundled data, is a name, not a path)."""
    return str(Path(path).expanduser().resolve()) if path and path != "sample" else path
