"""Checks of a run's config that need no model: a bad value fails in seconds, before anything loads.

Each raises a ``ConfigError`` naming the value and the override that fixes it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from hsd_exp.data.loaders import check_limit, load_examples
from hsd_exp.errors import ConfigError
from hsd_exp.eval.callbacks import bertscore_config
from hsd_exp.eval.metrics import resolve_bertscore_backbone, resolve_bertscore_device
from hsd_exp.report.runs import slug
from hsd_exp.skip.policies import Policy
from hsd_exp.trainer import world_size

TASKS = ("generate", "evaluate", "finetune", "finetune_evaluate", "compare")
TRAINING = ("finetune", "finetune_evaluate")


def build(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that lets our ConfigError through unwrapped (one clear message)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


class Plan(NamedTuple):
    policy: Policy
    compare: list[Policy]  # task=compare's policies
    world_size: int  # the ranks the configured Trainer runs (1 for task=generate, which builds none)


def check(cfg: DictConfig) -> Plan:
    """Every check of ``cfg`` that needs no model; returns the policies, built, and the Trainer's rank count."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task} is unknown; choose one of {', '.join(TASKS)}")
    ranks = 1 if cfg.task == "generate" else world_size(cfg.trainer)
    check_multirun_ddp(cfg, ranks)
    num_layers = cfg.model.num_layers  # policies check max <= L before the model loads
    policy = build(cfg.policy, num_layers=num_layers)
    compare = [build(p, num_layers=num_layers) for p in cfg.compare_policies]
    if cfg.task == "compare":
        check_compare(compare)
    if cfg.task in TRAINING:
        check_training(cfg, policy)
    if cfg.task != "generate" and cfg.bertscore.enabled:  # a typo or a missing backbone fails now, not after decoding
        resolve_bertscore_device(str(cfg.bertscore.device))
        resolve_bertscore_backbone(bertscore_config(cfg))
    if cfg.task != "generate":
        check_dataset(cfg)
    if cfg.ckpt_path:
        check_checkpoint(cfg.ckpt_path, cfg.finetune.mode)
    elif cfg.task == "evaluate" and cfg.finetune.mode != "none":
        raise ConfigError(f"task=evaluate with finetune={cfg.finetune.mode} needs ckpt_path=/path/to/last.ckpt "
                          "(or finetune=none to evaluate the base model)")
    return Plan(policy, compare, ranks)


def check_multirun_ddp(cfg: DictConfig, world_size: int) -> None:
    """Several ranks cannot run inside a Hydra multirun.

    Lightning starts ranks 1..N-1 by re-running this process's command line, -m (or a +sweep= that sets
    hydra.mode=MULTIRUN) included: each child would start a sweep of its own in another ``${now:...}`` folder, and
    rank 0's metrics.json would cover only its own share of the examples while the run exits 0.
    """
    if cfg.task == "generate" or world_size <= 1 or not HydraConfig.initialized():  # generate builds no Trainer
        return
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    raise ConfigError(
        f"trainer.devices={cfg.trainer.get('devices')} (num_nodes={cfg.trainer.get('num_nodes') or 1}, "
        f"strategy={cfg.trainer.get('strategy')}) starts {world_size} processes, which cannot run inside a Hydra "
        "multirun (hydra.mode=MULTIRUN, from -m or +sweep=...): Lightning relaunches the other ranks with this "
        "command line and each would start a sweep of its own, so only rank 0's examples would be scored. Run each "
        "setting as a single run with several devices, e.g. `for p in full hsd_s1_max18; do python -m hsd_exp "
        "... policy=$p; done`, or keep the multirun with trainer.devices=1 (one process per GPU, e.g. "
        "hydra/launcher=joblib with one CUDA_VISIBLE_DEVICES per job)")


def check_compare(compare: list[Policy]) -> None:
    """task=compare writes one run folder per policy: two policies sharing one would merge (resume)."""
    if not compare:
        raise ConfigError("task=compare needs compare_policies: a list of policy configs (see conf/experiment/demo.yaml)")
    dirs = [slug(p.label) for p in compare]
    if len(set(dirs)) < len(dirs):
        dup = next(p.label for p, d in zip(compare, dirs, strict=True) if dirs.count(d) > 1)
        raise ConfigError(f"compare_policies: more than one policy is labelled {dup} (run dir {slug(dup)}); "
                          "each entry must differ in the parameters its label shows")


def check_training(cfg: DictConfig, policy: Policy) -> None:
    if cfg.finetune.mode == "none":
        raise ConfigError(f"task={cfg.task} with finetune=none has nothing to train; set finetune=full or finetune=lora")
    if cfg.finetune.skip_aware and not policy.static:
        # The training forward has no cache and sees every target position at once; a dynamic policy (CALM)
        # decides its exit token by token from cached decoding, so the engine would fail mid-training.
        raise ConfigError(f"finetune.skip_aware=true needs a static policy, but policy={policy.name} "
                          f"({policy.label}) decides its layers per token while decoding; train with a static "
                          "one (policy=full, skipdecode or hsd, e.g. policy=hsd_s1_max18) and evaluate CALM "
                          "afterwards (task=evaluate policy=calm ckpt_path=<run>/checkpoints/last.ckpt), "
                          "or set finetune.skip_aware=false")


def check_dataset(cfg: DictConfig) -> None:
    """A bad dataset.path, dataset.limit or split would otherwise surface only inside trainer.fit/test."""
    check_limit(cfg.dataset.get("limit"))  # the checks below load one example only
    path = cfg.dataset.get("path")
    if path and path != "sample" and not Path(path).expanduser().exists():
        raise ConfigError(f"dataset.path={path} does not exist; point dataset.path at a folder with the "
                          f"{cfg.dataset.name} files, or dataset.path=sample for the bundled sample")
    if cfg.task in TRAINING:
        load_examples(cfg.dataset, split="train", limit=1)
    if cfg.task != "finetune":
        load_examples(cfg.dataset, limit=1)


def check_checkpoint(path: str, finetune_mode: str) -> None:
    """A Lightning checkpoint whose weights fit ``finetune``; read as weights only (no pickled code), memory-mapped.

    Keys and shapes are checked when Lightning restores it into the model (``tasks.checkpoint_must_fit``).
    """
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path} does not exist; give a Lightning .ckpt written by task=finetune")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ConfigError(f"ckpt_path={path} is not a Lightning checkpoint (not a torch.save file); give a "
                          "last.ckpt written by task=finetune")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - not a torch file, truncated, or pickled objects: bad input
        raise ConfigError(f"ckpt_path={path} cannot be read as a Lightning checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); give a last.ckpt written by task=finetune") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        raise ConfigError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict or version); give a "
                          "last.ckpt written by task=finetune")
    adapter_only = bool(ckpt.get("hsd_adapter_only"))
    if adapter_only and finetune_mode != "lora":
        raise ConfigError(f"ckpt_path={path} holds a LoRA adapter only: evaluate it with finetune=lora")
    if not adapter_only and finetune_mode == "lora":
        raise ConfigError(f"ckpt_path={path} holds full weights, not a LoRA adapter: evaluate it with "
                          "finetune=full (or none), not finetune=lora")
