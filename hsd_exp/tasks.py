"""What ``python -m hsd_exp task=...`` runs: generate, evaluate, finetune, finetune_evaluate, compare."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from hsd_exp.data.datamodule import HSDDataModule
from hsd_exp.data.loaders import check_limit, load_examples
from hsd_exp.data.prompts import build_prompt
from hsd_exp.errors import ConfigError
from hsd_exp.eval.callbacks import PredictionsCallback, SkipPolicyCallback, WarmUpCallback
from hsd_exp.eval.metrics import resolve_bertscore_backbone, resolve_bertscore_device
from hsd_exp.eval.predictions import read_predictions, read_run_predictions
from hsd_exp.models import LoadedModel, resolve_dtype
from hsd_exp.report.runs import flat_config, slug
from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.policies import Policy
from hsd_exp.train.module import CausalLMModule

log = logging.getLogger(__name__)
TASKS = ("generate", "evaluate", "finetune", "finetune_evaluate", "compare")


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


def build_policy(policy_cfg: DictConfig, num_layers: int | None) -> Policy:
    """Validated before any model is loaded (``model.num_layers`` gives L for the max <= L check)."""
    return build(policy_cfg, num_layers=num_layers)


def run(cfg: DictConfig) -> dict | None:
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task} is unknown; choose one of {', '.join(TASKS)}")
    _check_multirun_ddp(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    policy = build_policy(cfg.policy, cfg.model.get("num_layers"))
    compare = [build_policy(p, cfg.model.get("num_layers")) for p in cfg.get("compare_policies") or []]
    if cfg.task == "compare" and not compare:
        raise ConfigError("task=compare needs compare_policies: a list of policy configs (see conf/experiment/demo.yaml)")
    dirs = [slug(p.label) for p in compare]  # one run dir per policy: two sharing one would merge (resume)
    if len(set(dirs)) < len(dirs):
        dup = next(p.label for p, d in zip(compare, dirs, strict=True) if dirs.count(d) > 1)
        raise ConfigError(f"compare_policies: more than one policy is labelled {dup} (run dir {slug(dup)}); "
                          "each entry must differ in the parameters its label shows")
    if cfg.task in ("finetune", "finetune_evaluate") and cfg.finetune.mode == "none":
        raise ConfigError(f"task={cfg.task} with finetune=none has nothing to train; set finetune=full or finetune=lora")
    if cfg.task in ("finetune", "finetune_evaluate") and cfg.finetune.get("skip_aware") and not policy.static:
        # The training forward has no cache and sees every target position at once; a dynamic policy (CALM)
        # decides its exit token by token from cached decoding, so the engine would fail mid-training.
        raise ConfigError(f"finetune.skip_aware=true needs a static policy, but policy={policy.name} "
                          f"({policy.label}) decides its layers per token while decoding; train with a static "
                          "one (policy=full, skipdecode or hsd, e.g. policy=hsd_s1_max18) and evaluate CALM "
                          "afterwards (task=evaluate policy=calm ckpt_path=<run>/checkpoints/last.ckpt), "
                          "or set finetune.skip_aware=false")
    if cfg.task != "generate" and cfg.get("bertscore") and cfg.bertscore.get("enabled", True):
        # a typo or a missing backbone fails now, not after decoding
        resolve_bertscore_device(str(cfg.bertscore.get("device") or "auto"))
        resolve_bertscore_backbone(bertscore_config(cfg))
    if cfg.task in ("evaluate", "finetune_evaluate", "compare", "finetune"):
        _check_dataset(cfg)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; give a Lightning .ckpt written by task=finetune")
    if cfg.task == "evaluate" and cfg.finetune.mode != "none" and not cfg.get("ckpt_path"):
        raise ConfigError(f"task=evaluate with finetune={cfg.finetune.mode} needs ckpt_path=/path/to/last.ckpt "
                          "(or finetune=none to evaluate the base model)")

    lm: LoadedModel = build(cfg.model, **model_overrides(cfg))
    if cfg.task == "generate":
        return generate(cfg, lm, policy)
    module = CausalLMModule(lm.model, lm.tokenizer, finetune=_plain(cfg.finetune), decode=_plain(cfg.decode),
                            skip_policy=policy)
    ckpt = cfg.get("ckpt_path")
    if cfg.task in ("finetune", "finetune_evaluate"):
        ckpt = finetune(cfg, lm, module, ckpt)
    if cfg.task == "finetune":
        finish_wandb()
        return {"ckpt_path": ckpt}
    if ckpt:
        load_checkpoint(module, ckpt)
    if cfg.task == "compare":
        out_dir = Path(cfg.paths.output_dir)
        results = {p.label: evaluate(cfg, lm, module, p, out_dir / slug(p.label), ckpt) for p in compare}
        print_comparison(out_dir)
        return results
    return evaluate(cfg, lm, module, policy, Path(cfg.paths.output_dir), ckpt)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


# ---------------------------------------------------------------------------------------------- devices
def num_processes(trainer_cfg: DictConfig) -> int:
    """How many processes (ranks) the Trainer will run: devices x num_nodes, ``auto``/-1 counted as Lightning does.

    A value Lightning itself will reject counts 1: its own error then names it.
    """
    devices = trainer_cfg.get("devices", "auto")
    accelerator = str(trainer_cfg.get("accelerator") or "auto").lower()
    if isinstance(devices, ListConfig | list | tuple):
        n = len(devices)
    elif str(devices).strip() in ("auto", "-1"):
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        n = torch.cuda.device_count() if gpu else 1  # CPU: "auto" is one process
    elif isinstance(devices, str) and "," in devices:  # "0,1": device ids
        n = len([d for d in devices.split(",") if d.strip()])
    else:
        try:
            n = int(devices)
        except (TypeError, ValueError):
            n = 1
    try:
        nodes = int(trainer_cfg.get("num_nodes") or 1)
    except (TypeError, ValueError):
        nodes = 1
    return max(n, 1) * max(nodes, 1)


def _check_multirun_ddp(cfg: DictConfig) -> None:
    """Several ranks cannot run inside a Hydra multirun: fail before anything is loaded.

    Lightning starts ranks 1..N-1 by re-running this process's command line, -m (or a +sweep= that sets
    hydra.mode=MULTIRUN) included: each child starts a sweep of its own in another ``${now:...}`` folder, and
    rank 0's metrics.json then covers only its own share of the examples while the run exits 0.
    """
    if cfg.task == "generate" or not HydraConfig.initialized():  # generate builds no Trainer
        return
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    n = num_processes(cfg.trainer)
    if n <= 1:
        return
    raise ConfigError(
        f"trainer.devices={cfg.trainer.get('devices')} (num_nodes={cfg.trainer.get('num_nodes') or 1}, "
        f"strategy={cfg.trainer.get('strategy')}) starts {n} processes, which cannot run inside a Hydra multirun "
        "(hydra.mode=MULTIRUN, from -m or +sweep=...): Lightning relaunches the other ranks with this command "
        "line and each would start a sweep of its own, so only rank 0's examples would be scored. Run each "
        "setting as a single run with several devices, e.g. `for p in full hsd_s1_max18; do python -m hsd_exp "
        "... policy=$p; done`, or keep the multirun with trainer.devices=1 (one process per GPU, e.g. "
        "hydra/launcher=joblib with one CUDA_VISIBLE_DEVICES per job)")


def model_overrides(cfg: DictConfig) -> dict:
    """``load_model`` arguments the Trainer config decides: device, and dtype for full fine-tuning.

    - ``model.device=auto`` follows ``trainer.accelerator``: ``cpu`` loads on the CPU even where a GPU is
      visible. With several ranks each process loads on the CPU (whatever model.device says) and Lightning
      moves its copy to the rank's own device (loading onto cuda would put every rank's copy on cuda:0); dtype
      ``auto`` is then resolved for that device, not for the CPU it is loaded on.
    - ``finetune=full`` trains the weights themselves: they load (and stay) float32, and
      ``trainer.precision=bf16-mixed`` autocasts the forward. AdamW updates applied to bf16 weights are mostly
      rounded away (bf16 keeps ~3 significant digits; lr x update is far below that). LoRA keeps its
      adapters in float32 itself (peft), so the frozen base may stay bf16.
    """
    out: dict = {}
    device, dtype = str(cfg.model.get("device") or "auto"), str(cfg.model.get("dtype") or "auto")
    accelerator = str(cfg.trainer.get("accelerator") or "auto").lower()
    if cfg.task != "generate" and num_processes(cfg.trainer) > 1:  # even model.device=cuda: not all on cuda:0
        out["device"] = "cpu"
        if dtype == "auto":
            gpu = accelerator != "cpu" and torch.cuda.is_available()
            out["dtype"] = str(resolve_dtype("auto", torch.device("cuda" if gpu else "cpu"))).removeprefix("torch.")
    elif device == "auto" and accelerator == "cpu":
        out["device"] = "cpu"
    if cfg.task in ("finetune", "finetune_evaluate") and cfg.finetune.mode == "full":
        if dtype not in ("auto", "float32", "fp32"):
            raise ConfigError(f"finetune=full with model.dtype={dtype}: the trained weights must be float32 "
                              "(optimizer updates on half-precision weights are mostly rounded away); set "
                              "model.dtype=auto (or float32) and trainer.precision=bf16-mixed for a bf16 forward")
        out["dtype"] = "float32"
    return out


def _check_dataset(cfg: DictConfig) -> None:
    """Fail fast on a bad dataset.path, dataset.limit or split before the model loads."""
    check_limit(cfg.dataset.get("limit"))  # the checks below load one example only
    path = cfg.dataset.get("path")
    if path and path != "sample" and not Path(path).expanduser().exists():
        raise ConfigError(f"dataset.path={path} does not exist; point dataset.path at a folder with the "
                          f"{cfg.dataset.name} files, or dataset.path=sample for the bundled sample")
    # A missing split (or sample, or column) would otherwise surface only inside trainer.fit/test.
    if cfg.task in ("finetune", "finetune_evaluate"):
        load_examples(cfg.dataset, split="train", limit=1)
    if cfg.task != "finetune":
        load_examples(cfg.dataset, limit=1)


# ---------------------------------------------------------------------------------------------- generate
def generate(cfg: DictConfig, lm: LoadedModel, policy: Policy) -> dict:
    prompt = build_prompt(cfg.prompt, {"instruction": ""}, lm.tokenizer, lm.chat) if lm.chat else cfg.prompt
    enc = lm.tokenizer([prompt], return_tensors="pt", add_special_tokens=not lm.chat).to(lm.model.device)
    module = CausalLMModule(lm.model, lm.tokenizer, decode=_plain(cfg.decode))
    gen = module.generation_config()
    start = time.perf_counter()
    with layer_skipping(lm.model, policy, max_new_tokens=gen.max_new_tokens) as stats, torch.no_grad():
        out = lm.model.generate(**enc, generation_config=gen)
    seconds = time.perf_counter() - start
    text = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    result = {"model": lm.name, "policy": policy.label, "prompt": cfg.prompt, "completion": text,
              "avg_layers": stats.avg_layers, "num_layers": lm.num_layers, "seconds": round(seconds, 3)}
    print(f"\n[{lm.name} | {policy.label} | Avg. Layer {stats.avg_layers:.2f} of {lm.num_layers}]")
    print(f"> {cfg.prompt}\n{text}\n")
    return result


# ---------------------------------------------------------------------------------------------- Lightning
def make_trainer(cfg: DictConfig, callbacks: list, run_dir: Path, fit: bool = False,
                 run_name: str | None = None) -> pl.Trainer:
    """``run_name``: the W&B run's name when it is not the top-level policy's (task=compare: each policy's)."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        node = OmegaConf.to_container(node, resolve=True)
        node["save_dir"] = str(run_dir)
        if name == "csv" and not fit:  # finetune_evaluate: keep the training curves in csv/metrics.csv
            node["version"] = "eval"
        if name == "wandb" and node.get("offline") is None:
            node["offline"] = not _wandb_key_available()
        if name == "wandb" and run_name:
            node["name"] = run_name
        loggers.append(instantiate(node))
    for lg in loggers:
        lg.log_hyperparams(flat_config(OmegaConf.to_container(cfg, resolve=True)))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    callbacks = list(callbacks)
    progress = _progress_mode()
    if progress == "none":
        trainer_cfg["enable_progress_bar"] = False
    elif trainer_cfg.get("enable_progress_bar", True):  # training, evaluation and generation alike
        # explicit either way: Lightning's own default is Rich too whenever `rich` is installed
        bar = pl.callbacks.RichProgressBar() if progress == "rich" else pl.callbacks.TQDMProgressBar()
        callbacks.append(bar)
    overrides = dict(callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir))
    if not fit:
        overrides["enable_checkpointing"] = False
    trainer_cfg.update(overrides)
    return instantiate(trainer_cfg)


def finish_wandb() -> None:
    """End the W&B run this job opened, if any.

    WandbLogger reuses a run that is still open in the process, and Hydra's basic launcher runs every job of a
    multirun in one process (task=compare runs every policy in one job): without this, all of them would log
    into the first job's run, each overwriting the last one's metrics and sample table.
    """
    wandb = sys.modules.get("wandb")  # never imported unless logger=wandb made a run
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def finetune(cfg: DictConfig, lm: LoadedModel, module: CausalLMModule, resume: str | None) -> str:
    ft = cfg.finetune
    if ft.mode == "none":
        raise ConfigError("task=finetune needs finetune=full or finetune=lora")
    run_dir = Path(cfg.paths.output_dir)
    dm = HSDDataModule(cfg.dataset, lm.tokenizer, lm.chat, train_batch_size=ft.batch_size,
                       max_length=ft.max_length, train_limit=ft.train_limit, val_limit=ft.val_limit)
    dm.setup("fit")
    # last.ckpt every N steps: a run that dies resumes from there (ckpt_path=.../last.ckpt task=finetune)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                                           every_n_train_steps=ft.get("checkpoint_every_n_steps") or None)
    trainer = make_trainer(cfg, [ckpt_cb], run_dir, fit=True)
    if not dm.val_pairs:
        trainer.limit_val_batches = 0
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    last = ckpt_cb.last_model_path or str(run_dir / "checkpoints" / "last.ckpt")
    # With every_n_train_steps, ModelCheckpoint saves last.ckpt only at multiples of N (and at train end only
    # if it never saved): the final steps would be missing from the checkpoint that gets evaluated.
    if getattr(ckpt_cb, "_last_global_step_saved", None) != trainer.global_step or not Path(last).is_file():
        trainer.save_checkpoint(last)
    log.info("checkpoint: %s", last)
    if trainer.is_global_zero:  # the trained weights as safetensors, for transformers/peft outside this project
        export = run_dir / "hf_model"
        module.model.save_pretrained(export, safe_serialization=True)  # LoRA: the adapter only
        lm.tokenizer.save_pretrained(export)
        log.info("weights (safetensors): %s", export)
    return last


def _progress_mode() -> str:
    """``HSD_PROGRESS``: ``rich`` (default; plain under CI, whose logs cannot redraw), ``plain`` (tqdm) or
    ``none`` (no progress bar)."""
    mode = os.environ.get("HSD_PROGRESS", "rich").strip().lower() or "rich"
    if mode == "none":
        return mode
    return "rich" if mode == "rich" and not os.environ.get("CI") else "plain"  # any other value: plain, as before


def load_checkpoint(module: CausalLMModule, path: str) -> None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code from checkpoints
    except Exception as err:  # noqa: BLE001 - not a torch file, truncated, or pickled objects: bad input
        raise ConfigError(f"ckpt_path={path} cannot be read as a Lightning checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict)")
    state = ckpt["state_dict"]
    if ckpt.get("hsd_adapter_only"):
        if module.ft.get("mode") != "lora":
            raise ConfigError(f"ckpt_path={path} holds a LoRA adapter only: evaluate it with finetune=lora")
        missing_ok = True
    else:
        missing_ok = False
    try:
        result = module.load_state_dict(state, strict=not missing_ok)
    except RuntimeError as err:  # key or shape mismatch: another model, or a full checkpoint with finetune=lora
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))[:300]
        raise ConfigError(f"ckpt_path={path} does not fit model={module.model.config.model_type} with "
                          f"finetune={module.ft.get('mode')}: use the model it was trained from, and "
                          f"finetune=full (or none) for a full checkpoint ({first})") from None
    if missing_ok and result.unexpected_keys:
        raise ConfigError(f"ckpt_path={path}: adapter keys do not match this model ({result.unexpected_keys[:3]})")


def print_comparison(out_dir: Path) -> None:
    """task=compare: the report table of the policies just run, plus a few predictions side by side."""
    from hsd_exp.report.tables import collect_runs, write_report

    paths = write_report(collect_runs([str(out_dir)]), out_dir)
    print("\n" + Path(paths["md"]).read_text())
    runs = sorted(p for p in out_dir.iterdir() if (p / "predictions.jsonl").is_file())
    preds = {run.name: read_predictions(run / "predictions.jsonl") for run in runs}
    first = next(iter(preds.values()), [])
    for i, rec in enumerate(first[:2]):
        print(f"input: {rec['source']}\nreference: {rec['references'][0] if rec['references'] else ''}")
        for name, records in preds.items():
            print(f"  {name:>24}: {records[i]['prediction'] if i < len(records) else ''}")
        print()
    print(f"report: {paths['md']}  plot: {paths['png']}")


def bertscore_config(cfg: DictConfig) -> dict:
    """``cfg.bertscore`` with ``device: auto`` resolved to the run's device (cpu under trainer.accelerator=cpu)."""
    bs = _plain(cfg.bertscore)
    if str(bs.get("device") or "auto") == "auto" and str(cfg.trainer.get("accelerator") or "auto").lower() == "cpu":
        bs["device"] = "cpu"
    return bs


def _setting(cfg: DictConfig, lm: LoadedModel, policy: Policy, ckpt_path: str | None) -> dict:
    """What a run's predictions depend on (dataset.limit is not: a larger limit extends a run)."""
    def where(path):  # the same file however the command line spelled it
        return str(Path(path).expanduser().resolve()) if path and path != "sample" else path

    decode = {k: v for k, v in _plain(cfg.decode).items() if k != "batch_size"}
    return {"policy": policy.label, "model": lm.name, "model_path": where(cfg.model.get("path")),
            "ckpt_path": where(ckpt_path or cfg.get("ckpt_path")), "dataset": cfg.dataset.name,
            "dataset_path": where(cfg.dataset.get("path")), "split": cfg.dataset.split, "decode": decode}


def check_resume_setting(run_dir: Path, setting: dict, resuming: bool) -> None:
    """``run.json`` records the setting of the predictions in ``run_dir``; resuming with another one would mix
    two settings' predictions in one metrics.json (and keep a finished run's metrics under a new config)."""
    path = run_dir / "run.json"
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


def evaluate(cfg: DictConfig, lm: LoadedModel, module: CausalLMModule, policy: Policy, run_dir: Path,
             ckpt_path: str | None = None) -> dict:
    """``ckpt_path``: the checkpoint loaded into ``module`` (finetune_evaluate's own last.ckpt), for metrics.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    done = {str(r["id"]) for r in read_run_predictions(run_dir)}  # resume: skip ids already written (any rank)
    check_resume_setting(run_dir, _setting(cfg, lm, policy, ckpt_path), resuming=bool(done))
    if done:
        log.info("resuming: %d predictions already in %s", len(done), run_dir)
    dm = HSDDataModule(cfg.dataset, lm.tokenizer, lm.chat, eval_batch_size=cfg.decode.batch_size, skip_ids=done)
    meta = {"policy": policy.name, "policy_label": policy.label, "policy_params": policy.params(),
            "dataset": cfg.dataset.name, "split": cfg.dataset.split, "model": lm.name,
            "num_layers": lm.num_layers, "num_beams": cfg.decode.num_beams,
            "ckpt_path": ckpt_path or cfg.get("ckpt_path")}
    preds = PredictionsCallback(str(run_dir), bertscore_config(cfg), meta)
    # Warm-up first: one-time costs (allocator, first kernels) must not land in the first policy's tokens/s;
    # it runs once Lightning has put the model on this rank's device.
    callbacks = [WarmUpCallback(), SkipPolicyCallback(policy, int(cfg.decode.max_new_tokens)), preds]
    trainer = make_trainer(cfg, callbacks, run_dir, run_name=policy.label)
    try:
        trainer.test(module, datamodule=dm, verbose=False)
        if not dm.test_examples:  # nothing left to generate (resumed run): Lightning skips the loop and its hooks
            done_metrics = run_dir / "metrics.json"
            if done_metrics.is_file():  # finished before: keep its numbers (tokens/s of the run that generated)
                preds.metrics = json.loads(done_metrics.read_text())
            else:  # crashed after the last prediction, before metrics.json: score now
                preds.on_test_start(trainer, module)
                preds.on_test_end(trainer, module)
    finally:
        finish_wandb()
    m = preds.metrics or {}
    if not trainer.is_global_zero:  # DDP: rank 0 scores every rank's predictions
        return m
    log.info("%s: Avg. Layer %.2f | R-L %.2f | BLEU-1 %.2f | %s tok/s", policy.label, m.get("avg_layers") or 0,
             m.get("rougeL") or 0, m.get("bleu1") or 0, f"{m['tokens_per_s']:.1f}" if m.get("tokens_per_s") else "-")
    return m
