"""A run's config parsed once, before any model loads: ``RunSettings``.

``RunSettings.from_config(cfg)`` builds what every task then runs on (the policy and task=compare's policies,
the decode settings, the model's depth, the Trainer's rank count, what the checkpoint holds, where a SkipLayer
router comes from). Building is checking each value on its own (a policy validates its parameters, the decode
settings theirs); ``hsd_exp.preflight`` then checks what the values mean together and what is on disk or online.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hsd_exp.decoding import DecodeSettings
from hsd_exp.errors import ConfigError
from hsd_exp.models.loading import local_num_layers
from hsd_exp.models.shipped import adapter_router
from hsd_exp.skip.policies import Policy
from hsd_exp.train.trainer import world_size

TASKS = ("generate", "evaluate", "finetune", "finetune_evaluate", "compare")
TRAINING = ("finetune", "finetune_evaluate")


def build(node: DictConfig | dict, **kwargs):
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


@dataclass(frozen=True)
class CheckpointInfo:
    """What a Lightning checkpoint (``ckpt_path``) holds, read once; its weights are restored by Lightning later."""

    path: str
    adapter_only: bool  # the trained weights only (``hsd_adapter_only``): a LoRA adapter and/or a router
    has_lora: bool
    router_shape: dict | None  # the SkipRouter config it recorded (``hsd_router``); None: no router in it


@dataclass(frozen=True)
class RouterSource:
    """Where the SkipLayer router a run decodes with comes from: a checkpoint (its recorded shape; Lightning
    restores the weights) or a saved router folder (``router.json`` + ``router.safetensors``)."""

    named_by: str  # the override that names it, for messages: ckpt_path=..., model.adapter=...
    shape: dict | None  # SkipRouter's config; None: the checkpoint holds no router
    folder: Path | None = None

    def build(self, model):
        from hsd_exp.skip.router import SkipRouter

        if self.folder is not None:
            return SkipRouter.load(self.folder, model)
        return SkipRouter(**self.shape).to(model.device)


@dataclass(frozen=True)
class RunSettings:
    task: str
    policy: Policy
    compare: tuple[Policy, ...]  # task=compare's policies
    decode: DecodeSettings
    world_size: int  # the ranks the configured Trainer runs (1 for task=generate, which builds none)
    num_layers: int | None  # the model's depth: model.path's own (config.json), else model.num_layers
    checkpoint: CheckpointInfo | None
    bertscore: dict  # ``bertscore`` with its device resolved (bertscore_config)
    trains_router: bool  # the task trains SkipLayer's router (finetune.router)
    router: RouterSource | None  # the router the policies decode with (None: none of them routes, or none found)

    @property
    def policies(self) -> list[Policy]:
        return [self.policy, *self.compare]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunSettings:
        """Parse ``cfg``; the first value that cannot be parsed raises a ConfigError naming it.

        Order: what is typed first (task, Trainer, decode), then the model's depth (``model.path``'s family and
        depth before the policy, which is judged against that depth), then the checkpoint on disk."""
        if cfg.task not in TASKS:
            raise ConfigError(f"task={cfg.task} is unknown; choose one of {', '.join(TASKS)}")
        ranks = 1 if cfg.task == "generate" else world_size(cfg.trainer)
        decode = DecodeSettings.from_config(cfg.decode)
        num_layers = model_depth(cfg.model)  # policies check max <= L before the model loads
        policy = build(cfg.policy, num_layers=num_layers)
        compare = tuple(build(p, num_layers=num_layers) for p in cfg.compare_policies)
        checkpoint = read_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
        trains = cfg.task in TRAINING and bool(cfg.finetune.get("router"))
        routes = cfg.task != "generate" and any("router" in p.objects for p in (policy, *compare))
        router = router_source(checkpoint, None if trains else cfg.model.get("adapter")) if routes or trains else None
        return cls(cfg.task, policy, compare, decode, ranks, num_layers, checkpoint, bertscore_config(cfg), trains,
                   router)


def model_depth(model: DictConfig) -> int | None:
    """``model.num_layers``, or with ``model.path`` the path's own depth from its config.json (its family checked
    first): a model brought by path is judged by its own config, not by the preset it started from."""
    path = model.get("path")
    if not path:
        return model.get("num_layers")
    return local_num_layers(model.name, str(path), model.family, bool(model.get("trust_remote_code", False)))


def bertscore_config(cfg: DictConfig) -> dict:
    """``cfg.bertscore`` with ``device: auto`` resolved to the run's device (cpu under trainer.accelerator=cpu)."""
    bs = OmegaConf.to_container(cfg.bertscore, resolve=True)
    if bs["device"] == "auto" and str(cfg.trainer.accelerator).lower() == "cpu":
        bs["device"] = "cpu"
    return bs


def read_checkpoint(path: str) -> CheckpointInfo:
    """A Lightning checkpoint, read as weights only (no pickled code) and memory-mapped; ConfigError otherwise."""
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
    return CheckpointInfo(str(path), bool(ckpt.get("hsd_adapter_only")), any("lora_" in k for k in ckpt["state_dict"]),
                          ckpt.get("hsd_router"))


def router_source(checkpoint: CheckpointInfo | None, adapter: str | None) -> RouterSource | None:
    """The checkpoint's router (``ckpt_path`` wins), else the one saved beside ``model.adapter`` (its ``router/``
    folder); None when neither is given. A checkpoint without a router gives a source with no shape."""
    if checkpoint is not None:
        return RouterSource(f"ckpt_path={checkpoint.path}", checkpoint.router_shape)
    folder = adapter_router(adapter)
    if folder is None:
        return None
    return RouterSource(f"model.adapter={adapter}", json.loads((folder / "router.json").read_text()), folder)
