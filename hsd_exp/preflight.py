"""Checks of a run that need no model: a bad value fails in seconds, before anything loads.

``check(cfg)`` parses the config once (``RunSettings.from_config``: each value typed and built, which checks it
on its own) and then checks what the values mean together, what is on disk and what would be downloaded. Each
check raises a ``ConfigError`` naming the value and the override that fixes it.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hsd_exp.data.loaders import check_limit, check_required, load_examples
from hsd_exp.errors import ConfigError
from hsd_exp.eval.metrics import resolve_bertscore_backbone, resolve_bertscore_device
from hsd_exp.models.loading import check_hub_model, check_tokenizer_files
from hsd_exp.models.shipped import resolve_adapter
from hsd_exp.run_folder import slug
from hsd_exp.run_settings import TRAINING, CheckpointInfo, RunSettings
from hsd_exp.skip.policies import Policy
from hsd_exp.train.recipes import Recipe


def check(cfg: DictConfig) -> RunSettings:
    """Every check of ``cfg`` that needs no model; returns the parsed settings the task runs on.

    Order: mistakes in what is typed or on disk first (each fixed in seconds), then what would be downloaded, the
    model (the bigger download) before a Hub dataset, so an offline run names the model first.
    """
    run = RunSettings.from_config(cfg)
    check_multirun_ddp(cfg, run.world_size)
    check_positive("dataset.max_new_tokens", cfg.dataset.get("max_new_tokens"))
    if run.task == "compare":
        check_compare(run.compare)
    elif run.decode.lossless is not None and run.task != "finetune":  # the tasks that decode with the policy
        check_lossless_draft(run.policy, run.decode.max_new_tokens, run.num_layers)
    if run.task in TRAINING:
        check_training(cfg.finetune, run.task, run.policy, run.num_layers)
    if run.task != "generate" and run.bertscore["enabled"]:  # a typo or a missing backbone fails now, not after decoding
        resolve_bertscore_device(str(run.bertscore["device"]))
        resolve_bertscore_backbone(run.bertscore)
    if run.task != "generate":
        check_dataset(cfg.dataset, run.task)
    if run.checkpoint is not None:
        check_checkpoint(run.checkpoint, cfg.finetune.mode)
    elif run.task == "evaluate" and cfg.finetune.mode != "none":
        raise ConfigError(f"task=evaluate with finetune={cfg.finetune.mode} needs ckpt_path=/path/to/last.ckpt "
                          "(or finetune=none to evaluate the base model)")
    check_model_available(cfg.model)
    if run.task != "generate" and not cfg.dataset.get("path"):
        _load_one(cfg.dataset, run.task)  # a Hub dataset: probed after the model, the bigger download
    if run.trains_router:
        check_router_settings(cfg.router, run.num_layers)
    elif run.task != "generate" and any("router" in p.objects for p in run.policies):
        check_decode_router(run)
    return run


def check_positive(key: str, value) -> None:
    """``dataset.max_new_tokens``, when set: decode.max_new_tokens and training's length budget interpolate it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{key}={value!r} must be a positive integer; set {key}=48 (the tokens to generate per "
                          "input)")


# ------------------------------------------------------------------------------------------------- model
def check_model_available(model: DictConfig) -> None:
    """A Hub model neither in the local cache nor downloadable fails here, before any data is fetched; so does a
    ``model.adapter`` that names no adapter."""
    if model.get("adapter"):
        resolve_adapter(model.adapter)
    if model.get("path"):
        check_tokenizer_files(model.name, str(model.path), bool(model.get("trust_remote_code", False)))
        return
    if model.get("source", "hub") != "hub":
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


# ---------------------------------------------------------------------------------------------- policies
def check_compare(compare: tuple[Policy, ...]) -> None:
    """task=compare writes one run folder per policy: two policies sharing one would merge (resume)."""
    if not compare:
        raise ConfigError("task=compare needs compare_policies: a list of policy configs (see conf/experiment/demo.yaml)")
    dirs = [slug(p.label) for p in compare]
    if len(set(dirs)) < len(dirs):
        dup = next(p.label for p, d in zip(compare, dirs, strict=True) if dirs.count(d) > 1)
        raise ConfigError(f"compare_policies: more than one policy is labelled {dup} (run dir {slug(dup)}); "
                          "each entry must differ in the parameters its label shows")


def check_lossless_draft(policy: Policy, max_new_tokens: int, num_layers: int | None) -> None:
    """decode=lossless with a policy that runs every layer at every step (policy=full) drafts with the full model:
    every draft is accepted, and each round pays draft_len full forwards plus a verification, so it is plain
    greedy decoding made slower. Refused (the Python API allows it, as a check of the rounds themselves)."""
    if num_layers is None or not policy.static:
        every = policy.name == "full"
    else:
        every = all(len(policy.layers(t, max_new_tokens, num_layers)) == num_layers for t in range(max_new_tokens))
    if every:
        raise ConfigError(f"decode=lossless with policy={policy.label} drafts with the full model (every layer at "
                          "every step): the same output as decode=greedy, only slower; draft with a skipping policy "
                          "(e.g. policy=hsd_s1_max18) or drop decode=lossless")


def check_training(finetune: DictConfig, task: str, policy: Policy, num_layers: int | None = None) -> None:
    if finetune.mode == "none" and not finetune.get("router"):
        raise ConfigError(f"task={task} with finetune=none has nothing to train; set finetune=full or "
                          "finetune=lora (or finetune.router=true to train SkipLayer's router alone)")
    if finetune.skip_aware and not policy.static:
        # The training forward has no cache and sees every target position at once; a dynamic policy (CALM)
        # decides its exit token by token from cached decoding, so the engine would fail mid-training.
        raise ConfigError(f"finetune.skip_aware=true needs a static policy, but policy={policy.name} "
                          f"({policy.label}) decides its layers per token while decoding; train with a static "
                          "one (policy=full, skipdecode or hsd, e.g. policy=hsd_s1_max18) and evaluate CALM "
                          "afterwards (task=evaluate policy=calm ckpt_path=<run>/checkpoints/last.ckpt), "
                          "or set finetune.skip_aware=false")
    Recipe.from_config(OmegaConf.to_container(finetune, resolve=True), policy, num_layers)  # the recipe's keys


# ------------------------------------------------------------------------------------------------- data
def check_dataset(dataset: DictConfig, task: str) -> None:
    """A bad dataset.path, dataset.limit or split would otherwise surface only inside trainer.fit/test.

    Local data (``dataset.path``) is read here; a Hub dataset is probed later, after the model: offline, the model
    is named first, as the bigger download."""
    check_limit(dataset.get("limit"))  # the checks below load one example only
    check_required(OmegaConf.to_container(dataset))  # dataset=custom's ??? values, all named at once
    path = dataset.get("path")
    if path and path != "sample" and not Path(path).expanduser().exists():
        raise ConfigError(f"dataset.path={path} does not exist; point dataset.path at a folder with the "
                          f"{dataset.name} files, or dataset.path=sample for the bundled sample")
    if path:
        _load_one(dataset, task)


def _load_one(dataset: DictConfig, task: str) -> None:
    if task in TRAINING:
        load_examples(dataset, split="train", limit=1)
    if task != "finetune":
        load_examples(dataset, limit=1)


# ------------------------------------------------------------------------------------------- checkpoints
def check_checkpoint(ckpt: CheckpointInfo, finetune_mode: str) -> None:
    """The checkpoint's weights fit ``finetune``. Keys and shapes are checked when Lightning restores it into the
    model (``tasks.checkpoint_must_fit``)."""
    path = ckpt.path
    if ckpt.adapter_only and not ckpt.has_lora:  # SkipLayer's router trained alone on the frozen backbone
        if finetune_mode != "none":
            raise ConfigError(f"ckpt_path={path} holds a router only (trained on the frozen model): evaluate it "
                              "with finetune=none")
    elif ckpt.adapter_only and finetune_mode != "lora":
        raise ConfigError(f"ckpt_path={path} holds a LoRA adapter only: evaluate it with finetune=lora")
    elif not ckpt.adapter_only and finetune_mode == "lora":
        raise ConfigError(f"ckpt_path={path} holds full weights, not a LoRA adapter: evaluate it with "
                          "finetune=full (or none), not finetune=lora")


# ------------------------------------------------------------------------------------------------ router
def check_router_settings(router: DictConfig, num_layers: int | None) -> None:
    """SkipLayer: the settings of the router a task trains (the one its evaluation then decodes with)."""
    from hsd_exp.skip.router import check_router_config

    check_router_config(**{**OmegaConf.to_container(router, resolve=True), "num_layers": num_layers})


def check_decode_router(run: RunSettings) -> None:
    """policy=skiplayer decodes with a trained router of this depth: from ckpt_path, or saved with model.adapter."""
    source = run.router
    if source is None:
        raise ConfigError("policy=skiplayer needs a trained router: ckpt_path=<run>/checkpoints/last.ckpt of a "
                          "run with finetune.router=true (or task=finetune_evaluate finetune.router=true), or "
                          "model.adapter=<an adapter with a router/ folder, e.g. smollm2_e2e_skiplayer>")
    if source.shape is None:
        raise ConfigError(f"{source.named_by} holds no router: policy=skiplayer needs a checkpoint trained with "
                          "finetune.router=true")
    if run.num_layers is not None and source.shape["num_layers"] != run.num_layers:
        raise ConfigError(f"{source.named_by} holds a router for {source.shape['num_layers']} layers, but "
                          f"model.num_layers={run.num_layers}: evaluate it with the model it was trained on")
