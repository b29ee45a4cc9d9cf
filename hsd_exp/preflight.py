"""Checks of a run's config that need no model: a bad value fails in seconds, before anything loads.

Each raises a ``ConfigError`` naming the value and the override that fixes it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hsd_exp.data.loaders import check_limit, check_required, load_examples
from hsd_exp.errors import ConfigError
from hsd_exp.eval.callbacks import bertscore_config
from hsd_exp.eval.metrics import resolve_bertscore_backbone, resolve_bertscore_device
from hsd_exp.models import check_hub_model, local_num_layers
from hsd_exp.report.runs import slug
from hsd_exp.shipped import adapter_router, resolve_adapter
from hsd_exp.skip.lossless import check_confidence
from hsd_exp.skip.policies import Policy
from hsd_exp.train.recipes import Recipe
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
    num_layers: int | None = None  # the model's depth: model.path's own (config.json), else model.num_layers
    router_shape: dict | None = None  # the SkipRouter config ckpt_path recorded (None: no router in it)


def check(cfg: DictConfig) -> Plan:
    """Every check of ``cfg`` that needs no model; returns the policies, built, the Trainer's rank count and the
    model's depth.

    Order: mistakes in what is typed or on disk first (each fixed in seconds), then what would be downloaded, the
    model (the bigger download) before a Hub dataset, so an offline run names the model first.
    """
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task} is unknown; choose one of {', '.join(TASKS)}")
    ranks = 1 if cfg.task == "generate" else world_size(cfg.trainer)
    check_multirun_ddp(cfg, ranks)
    check_decode(cfg)
    num_layers = model_depth(cfg.model)  # policies check max <= L before the model loads
    policy = build(cfg.policy, num_layers=num_layers)
    compare = [build(p, num_layers=num_layers) for p in cfg.compare_policies]
    if cfg.task == "compare":
        check_compare(compare)
    if cfg.task in TRAINING:
        check_training(cfg, policy, num_layers)
    if cfg.task != "generate" and cfg.bertscore.enabled:  # a typo or a missing backbone fails now, not after decoding
        resolve_bertscore_device(str(cfg.bertscore.device))
        resolve_bertscore_backbone(bertscore_config(cfg))
    if cfg.task != "generate":
        check_dataset(cfg)
    router_shape = None
    if cfg.ckpt_path:
        router_shape = check_checkpoint(cfg.ckpt_path, cfg.finetune.mode)
    elif cfg.task == "evaluate" and cfg.finetune.mode != "none":
        raise ConfigError(f"task=evaluate with finetune={cfg.finetune.mode} needs ckpt_path=/path/to/last.ckpt "
                          "(or finetune=none to evaluate the base model)")
    check_model_available(cfg.model)
    if cfg.task != "generate":
        check_hub_dataset(cfg)
    check_router(cfg, [policy, *compare], num_layers, router_shape)
    return Plan(policy, compare, ranks, num_layers, router_shape)


# ------------------------------------------------------------------------------------------------ decode
def max_new_tokens_key(cfg: DictConfig) -> str:
    """The override that sets decode.max_new_tokens: dataset.max_new_tokens while decode keeps its interpolation."""
    raw = OmegaConf.to_container(cfg.decode, resolve=False).get("max_new_tokens")
    return "dataset.max_new_tokens" if raw == "${dataset.max_new_tokens}" else "decode.max_new_tokens"


def _positive_int(key: str, value, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer; set {fix}")


LOSSLESS_KEYS = ("lossless", "draft_len", "draft_confidence")  # decode=lossless: how the engine decodes, not GenerationConfig fields


def lossless_settings(decode: DictConfig) -> dict:
    """``layer_skipping``'s lossless arguments from the ``decode`` node (absent: plain skipping)."""
    return {"lossless": bool(decode.get("lossless", False)), "draft_len": decode.get("draft_len", 4),
            "draft_confidence": decode.get("draft_confidence")}


def check_decode(cfg: DictConfig) -> None:
    """Decoding values generate() would reject (or crash on) only after the model has loaded."""
    d = cfg.decode
    if d.get("lossless"):
        _positive_int("decode.draft_len", d.get("draft_len"), "decode.draft_len=4 (tokens drafted per verification)")
        check_confidence(d.get("draft_confidence"), "decode.draft_confidence")
        if d.get("num_beams") != 1:
            raise ConfigError(f"decode=lossless needs num_beams=1 (got {d.get('num_beams')}): beam search keeps no "
                              "single draft to verify; drop the decode.num_beams override")
    _positive_int("decode.batch_size", d.get("batch_size"), "decode.batch_size=8 (examples per generate() call)")
    _positive_int("decode.num_beams", d.get("num_beams"), "decode.num_beams=1 (greedy or sampling) or 4 (decode=beam4)")
    if cfg.dataset.get("max_new_tokens") is not None:
        _positive_int("dataset.max_new_tokens", cfg.dataset.max_new_tokens,
                      "dataset.max_new_tokens=48 (the tokens to generate per input)")
    key = max_new_tokens_key(cfg)
    _positive_int(key, d.get("max_new_tokens"), f"{key}=48 (the tokens to generate per input)")
    if d.get("do_sample"):
        temperature, top_p = d.get("temperature", 1.0), d.get("top_p", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
            raise ConfigError(f"decode.temperature={temperature!r} must be > 0 when sampling (decode.do_sample=true); "
                              "set decode.temperature=0.7, or decode=greedy for deterministic decoding")
        if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
            raise ConfigError(f"decode.top_p={top_p!r} must be in (0, 1] when sampling; set decode.top_p=0.9 "
                              "(1.0 = no nucleus cut)")
    penalty = d.get("repetition_penalty", 1.0)
    if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, int | float) or penalty <= 0):
        raise ConfigError(f"decode.repetition_penalty={penalty!r} must be > 0; set decode.repetition_penalty=1.0 "
                          "(no penalty)")
    node = OmegaConf.to_container(d, resolve=True)
    for key in ("batch_size", *LOSSLESS_KEYS):
        node.pop(key, None)
    try:  # transformers' own checks of the rest (e.g. +decode.num_beam_groups that does not divide num_beams)
        build(node)
    except Exception as err:  # noqa: BLE001 - GenerationConfig refuses the combination: bad input
        cause = err.__cause__ or err
        raise ConfigError(f"decode: {str(cause).splitlines()[0][:300]} (fix the decode.* override)") from None


# ------------------------------------------------------------------------------------------------- model
def model_depth(model: DictConfig) -> int | None:
    """``model.num_layers``, or with ``model.path`` the path's own depth from its config.json (its family checked
    first): a model brought by path is judged by its own config, not by the preset it started from."""
    path = model.get("path")
    if not path:
        return model.get("num_layers")
    return local_num_layers(model.name, str(path), model.family, bool(model.get("trust_remote_code", False)))


def check_model_available(model: DictConfig) -> None:
    """A Hub model neither in the local cache nor downloadable fails here, before any data is fetched; so does a
    ``model.adapter`` that names no adapter."""
    if model.get("adapter"):
        resolve_adapter(model.adapter)
    if model.get("path") or model.get("source", "hub") != "hub":
        return
    check_hub_model(model.name, model.get("hub_id"), model.get("revision"),
                    bool(model.get("trust_remote_code", False)))


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


def check_training(cfg: DictConfig, policy: Policy, num_layers: int | None = None) -> None:
    if cfg.finetune.mode == "none" and not cfg.finetune.get("router"):
        raise ConfigError(f"task={cfg.task} with finetune=none has nothing to train; set finetune=full or "
                          "finetune=lora (or finetune.router=true to train SkipLayer's router alone)")
    if cfg.finetune.skip_aware and not policy.static:
        # The training forward has no cache and sees every target position at once; a dynamic policy (CALM)
        # decides its exit token by token from cached decoding, so the engine would fail mid-training.
        raise ConfigError(f"finetune.skip_aware=true needs a static policy, but policy={policy.name} "
                          f"({policy.label}) decides its layers per token while decoding; train with a static "
                          "one (policy=full, skipdecode or hsd, e.g. policy=hsd_s1_max18) and evaluate CALM "
                          "afterwards (task=evaluate policy=calm ckpt_path=<run>/checkpoints/last.ckpt), "
                          "or set finetune.skip_aware=false")
    Recipe.from_config(OmegaConf.to_container(cfg.finetune, resolve=True), policy, num_layers)  # the recipe's keys


def check_dataset(cfg: DictConfig) -> None:
    """A bad dataset.path, dataset.limit or split would otherwise surface only inside trainer.fit/test.

    Local data (``dataset.path``) is read here; a Hub dataset is probed later (``check_hub_dataset``), after the
    model: offline, the model is named first, as the bigger download."""
    check_limit(cfg.dataset.get("limit"))  # the checks below load one example only
    check_required(OmegaConf.to_container(cfg.dataset))  # dataset=custom's ??? values, all named at once
    path = cfg.dataset.get("path")
    if path and path != "sample" and not Path(path).expanduser().exists():
        raise ConfigError(f"dataset.path={path} does not exist; point dataset.path at a folder with the "
                          f"{cfg.dataset.name} files, or dataset.path=sample for the bundled sample")
    if path:
        _load_one(cfg)


def check_hub_dataset(cfg: DictConfig) -> None:
    if not cfg.dataset.get("path"):
        _load_one(cfg)


def _load_one(cfg: DictConfig) -> None:
    if cfg.task in TRAINING:
        load_examples(cfg.dataset, split="train", limit=1)
    if cfg.task != "finetune":
        load_examples(cfg.dataset, limit=1)


def check_checkpoint(path: str, finetune_mode: str) -> dict | None:
    """A Lightning checkpoint whose weights fit ``finetune``; read as weights only (no pickled code), memory-mapped.
    Returns the router shape it recorded (``hsd_router``; None without a router), read here once.

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
    has_lora = any("lora_" in k for k in ckpt["state_dict"])
    if adapter_only and not has_lora:  # SkipLayer's router trained alone on the frozen backbone
        if finetune_mode != "none":
            raise ConfigError(f"ckpt_path={path} holds a router only (trained on the frozen model): evaluate it "
                              "with finetune=none")
    elif adapter_only and finetune_mode != "lora":
        raise ConfigError(f"ckpt_path={path} holds a LoRA adapter only: evaluate it with finetune=lora")
    elif not adapter_only and finetune_mode == "lora":
        raise ConfigError(f"ckpt_path={path} holds full weights, not a LoRA adapter: evaluate it with "
                          "finetune=full (or none), not finetune=lora")
    return ckpt.get("hsd_router")


def check_router(cfg: DictConfig, policies: list[Policy], num_layers: int | None, recorded: dict | None) -> None:
    """SkipLayer: the router's settings when one trains; a checkpoint holding a router (of this depth) when
    policy=skiplayer decodes. ``recorded``: the router shape ckpt_path holds (check_checkpoint read it)."""
    from hsd_exp.skip.router import check_router_config

    if cfg.task in TRAINING and cfg.finetune.get("router"):
        check_router_config(**{**OmegaConf.to_container(cfg.router, resolve=True), "num_layers": num_layers})
        return  # the router it trains is the one evaluation uses
    if cfg.task == "generate" or not any("router" in p.objects for p in policies):
        return
    beside = adapter_router(cfg.model.get("adapter"))  # a router saved with model.adapter
    if not cfg.ckpt_path and beside is not None:
        recorded = json.loads((beside / "router.json").read_text())
    elif not cfg.ckpt_path:
        raise ConfigError("policy=skiplayer needs a trained router: ckpt_path=<run>/checkpoints/last.ckpt of a "
                          "run with finetune.router=true (or task=finetune_evaluate finetune.router=true), or "
                          "model.adapter=<an adapter with a router/ folder, e.g. smollm2_e2e_skiplayer>")
    if recorded is None:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} holds no router: policy=skiplayer needs a checkpoint "
                          "trained with finetune.router=true")
    if num_layers is not None and recorded["num_layers"] != num_layers:
        source = f"ckpt_path={cfg.ckpt_path}" if cfg.ckpt_path else f"model.adapter={cfg.model.adapter}"
        raise ConfigError(f"{source} holds a router for {recorded['num_layers']} layers, but "
                          f"model.num_layers={num_layers}: evaluate it with the model it was trained on")
