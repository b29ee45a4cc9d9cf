"""Resuming an evaluation in its run folder: ``run.json`` records the setting its predictions belong to."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hsd_exp.errors import ConfigError

RUN_FILE = "run.json"
NOT_DECODING = ("_target_", "batch_size")  # decode keys that do not change a prediction


def setting(cfg: DictConfig, model: str, policy_label: str, ckpt_path: str | None) -> dict:
    """What a run's predictions depend on (not dataset.limit: a larger limit extends a run)."""
    def where(path):  # the same file however the command line spelled it
        return str(Path(path).expanduser().resolve()) if path and path != "sample" else path

    decode = {k: v for k, v in OmegaConf.to_container(cfg.decode, resolve=True).items() if k not in NOT_DECODING}
    return {"policy": policy_label, "model": model, "model_path": where(cfg.model.get("path")),
            "adapter": cfg.model.get("adapter"), "ckpt_path": where(ckpt_path), "dataset": cfg.dataset.name,
            "dataset_path": where(cfg.dataset.get("path")), "split": cfg.dataset.split, "decode": decode}


def recorded_setting(cfg: DictConfig, chat: bool) -> dict:
    """What metrics.json records of a run's setting besides policy, model, dataset and checkpoint: the values
    as the config gives them (like .hydra/config.yaml; ``chat``: the prompt format the model ran with). The
    report pairs each run with the Full run that shares these (hsd_exp.report.runs.SETTING_FIELDS)."""
    data, decode = cfg.dataset, cfg.decode
    return {"model_path": cfg.model.get("path"), "adapter": cfg.model.get("adapter"), "chat": chat, "dataset_path": data.get("path"),
            "limit": data.get("limit"), "instruction": data.get("instruction"), "separator": data.get("separator"),
            "max_source_tokens": data.get("max_source_tokens"), "do_sample": decode.get("do_sample"),
            "max_new_tokens": decode.get("max_new_tokens"), "temperature": decode.get("temperature"),
            "top_p": decode.get("top_p")}


def check_resume_limit(run_dir: Path, limit: int | None, scored: int) -> None:
    """Refuse to resume ``run_dir`` under a ``dataset.limit`` below the number of examples it already holds:
    its metrics cover every prediction in the folder, so they would be labelled with a limit they exceed.
    A larger limit (or none) extends the run."""
    if limit is not None and scored > int(limit):
        raise ConfigError(f"{run_dir} holds predictions for {scored} examples but dataset.limit={limit}: its "
                          f"metrics would cover all {scored} (a run folder only grows). Resume it with "
                          f"dataset.limit={scored} or more (or null), give this run its own folder "
                          f"(hydra.run.dir=...), or delete {run_dir} to start over")


def check_resume_setting(run_dir: Path, setting: dict, resuming: bool) -> None:
    """Refuse to resume ``run_dir`` with another setting (one metrics.json would mix two settings' predictions);
    otherwise record ``setting`` in its ``run.json``."""
    path = run_dir / RUN_FILE
    if resuming and path.is_file():
        before = json.loads(path.read_text())
        now = json.loads(json.dumps(setting))  # the types JSON gives back (tuples as lists)
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if diff:
            what = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in diff)
            raise ConfigError(f"{run_dir} holds predictions of another setting ({what}): resuming would mix them. "
                              f"Give this run its own folder (hydra.run.dir=...), or delete {run_dir} to start over")
    if not resuming or not path.is_file():  # a run folder from before run.json: adopt the current setting
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # DDP: every rank writes the same content
        tmp.write_text(json.dumps(setting, indent=1) + "\n")
        tmp.replace(path)
