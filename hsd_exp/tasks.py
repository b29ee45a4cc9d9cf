"""What ``python -m hsd_exp task=...`` runs: generate, evaluate, finetune, finetune_evaluate, compare.

Each task checks the config (``preflight.check``, which parses it once into ``RunSettings``), loads the model,
builds its Lightning pieces from the settings and runs them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import LogitsProcessorList

from hsd_exp import preflight
from hsd_exp.console import StepTick, empty_answer, progress_bar, result_line
from hsd_exp.data.context import check_context, check_prompt_fits, prompt_room
from hsd_exp.data.datamodule import HSDDataModule
from hsd_exp.data.prompts import build_prompt, prompt_format, prompt_special_tokens
from hsd_exp.decoding import LOSSLESS_KEYS
from hsd_exp.errors import ConfigError
from hsd_exp.eval.callbacks import (
    PredictionsCallback,
    SkipPolicyCallback,
    TokenProgressCallback,
    WarmUpCallback,
)
from hsd_exp.eval.predictions import read_predictions, read_run_predictions
from hsd_exp.eval.resume import check_resume_limit, check_resume_setting
from hsd_exp.models.loading import LoadedModel, resolve_dtype
from hsd_exp.run_folder import PREDICTIONS_FILE, recorded_setting, resume_key, slug
from hsd_exp.run_settings import TRAINING, RouterSource, RunSettings, build, router_source
from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.policies import Policy
from hsd_exp.train.module import CausalLMModule
from hsd_exp.train.trainer import finish_wandb, make_trainer, wandb_run_name

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict | None:
    settings = preflight.check(cfg)  # the config parsed once and checked, before anything heavy loads
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # model.path: the depth its config.json gave preflight, whatever the preset it started from says
    depth = {"num_layers": settings.num_layers} if cfg.model.get("path") else {}
    lm: LoadedModel = build(cfg.model, **model_overrides(cfg, settings.world_size), **depth)
    if cfg.task == "generate":
        return generate(cfg, settings, lm)
    check_context(cfg.dataset, settings.decode, lm)
    module = lightning_module(cfg, lm, settings)
    ckpt = cfg.ckpt_path
    if cfg.task in TRAINING:
        ckpt = finetune(cfg, lm, module, resume=ckpt)
    if cfg.task == "finetune":
        finish_wandb()
        return {"ckpt_path": ckpt}
    restore = ckpt if cfg.task != "finetune_evaluate" else None  # the trained weights are in module already
    if cfg.task == "compare":
        return compare(cfg, settings, lm, module, ckpt, restore)
    return evaluate(cfg, settings, lm, module, settings.policy, Path(cfg.paths.output_dir), ckpt, restore)


def compare(cfg: DictConfig, settings: RunSettings, lm: LoadedModel, module: CausalLMModule, ckpt: str | None,
            restore: str | None) -> dict:
    """task=compare: each policy into its own folder (``slug`` of its label), then the report over them.

    With decode=lossless the Full row (a ``baseline`` policy) still decodes plainly (``plain_decoding``): it is
    the output the lossless rows promise and the speed they are measured against; drafting with the full model
    verifies nothing. Baselines run first, so a lossless row's result line can name its speedup over them."""
    out_dir = Path(cfg.paths.output_dir)
    plain = plain_decoding(cfg, settings) if settings.decode.lossless is not None else (cfg, settings)
    results, reference = {}, None
    for p in sorted(settings.compare, key=lambda p: not p.baseline):  # stable: otherwise the config's order
        run_cfg, run_settings = plain if p.baseline else (cfg, settings)
        results[p.label] = evaluate(run_cfg, run_settings, lm, module, p, out_dir / slug(p.label), ckpt, restore,
                                    plain=reference)
        reference = reference or (results[p.label] if p.baseline else None)
        restore = None  # the checkpoint is restored once, for the first policy
    print_comparison(out_dir)
    return {p.label: results[p.label] for p in settings.compare}


def plain_decoding(cfg: DictConfig, settings: RunSettings) -> tuple[DictConfig, RunSettings]:
    """``cfg`` and ``settings`` as decode=greedy with the same generation settings: decode=lossless's own keys
    (``lossless``, ``draft_len``, ``draft_confidence``) dropped, so run.json and metrics.json record a plain run."""
    plain = copy.deepcopy(cfg)
    node = OmegaConf.to_container(cfg.decode, resolve=True)
    with open_dict(plain):
        plain.decode = {k: v for k, v in node.items() if k not in ("lossless", *LOSSLESS_KEYS)}
    return plain, dataclasses.replace(settings, decode=dataclasses.replace(settings.decode, lossless=None))


def model_overrides(cfg: DictConfig, world_size: int) -> dict:
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
    device, dtype = str(cfg.model.device), str(cfg.model.dtype)
    accelerator = str(cfg.trainer.accelerator).lower()
    if cfg.task != "generate" and world_size > 1:  # even model.device=cuda: not all on cuda:0
        out["device"] = "cpu"
        if dtype == "auto":
            gpu = accelerator != "cpu" and torch.cuda.is_available()
            out["dtype"] = str(resolve_dtype("auto", torch.device("cuda" if gpu else "cpu"))).removeprefix("torch.")
    elif device == "auto" and accelerator == "cpu":
        out["device"] = "cpu"
    if cfg.task in TRAINING and cfg.finetune.mode == "full":
        if dtype not in ("auto", "float32", "fp32"):
            raise ConfigError(f"finetune=full with model.dtype={dtype}: the trained weights must be float32 "
                              "(optimizer updates on half-precision weights are mostly rounded away); set "
                              "model.dtype=auto (or float32) and trainer.precision=bf16-mixed for a bf16 forward")
        out["dtype"] = "float32"
    return out


def lightning_module(cfg: DictConfig, lm: LoadedModel, settings: RunSettings) -> CausalLMModule:
    ft = cfg.finetune
    router_cfg = OmegaConf.to_container(cfg.router, resolve=True) if "router" in cfg else {}
    return CausalLMModule(lm.model, lm.tokenizer, settings.decode.generation_config(lm.tokenizer),
                          finetune=OmegaConf.to_container(ft, resolve=True),
                          optimizer=build(ft.optimizer) if "optimizer" in ft else None,
                          skip_policy=settings.policy if ft.get("skip_aware") else None,
                          router=make_router(cfg, lm, settings.policies, router_cfg, settings.router),
                          router_cfg=router_cfg)


def make_router(cfg: DictConfig, lm: LoadedModel, policies: list[Policy], router_cfg: dict,
                source: RouterSource | None = None):
    """SkipLayer's router when one trains (finetune.router) or decodes (policy=skiplayer): in the shape
    ``source`` gives (the checkpoint's, whose weights Lightning then restores, or a saved router loaded with its
    weights), else dense-initialised from ``router``'s settings. ``source`` None: the router saved beside
    ``model.adapter``, if any (``RunSettings.router`` found none elsewhere)."""
    trains = bool(cfg.finetune.get("router"))
    if not trains and not any("router" in p.objects for p in policies):
        return None
    from hsd_exp.skip.router import SkipRouter

    if source is None and not trains:
        source = router_source(None, cfg.model.get("adapter"))
    if source is not None and source.shape is not None:
        return source.build(lm.model)
    return SkipRouter.for_model(lm.model, **{k: v for k, v in router_cfg.items() if k in SkipRouter.SETTINGS})


@contextmanager
def checkpoint_must_fit(path: str | None, module: CausalLMModule, model: str | None = None):
    """Lightning's key/shape mismatch while restoring ``path`` as a ConfigError naming the model (``model``: its
    preset name, ``LoadedModel.name``, as the user sets it with model=...) and the fix."""
    try:
        yield
    except RuntimeError as err:
        if not path or "Error(s) in loading state_dict" not in str(err):
            raise
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))[:300]
        name = model or module.model.config.model_type
        raise ConfigError(f"ckpt_path={path} does not fit model={name} with "
                          f"finetune={module.ft['mode']}: use the model it was trained from, and "
                          f"finetune=full (or none) for a full checkpoint ({first})") from None


def progress_enabled(cfg: DictConfig) -> bool:
    """callbacks=none (or trainer.enable_progress_bar=false) turns every bar off, task=generate's too."""
    return bool(cfg.get("callbacks")) and cfg.trainer.get("enable_progress_bar", True) is not False


# ---------------------------------------------------------------------------------------------- tasks
def generate(cfg: DictConfig, settings: RunSettings, lm: LoadedModel) -> dict:
    """One completion of ``cfg.prompt`` under the policy, decoded as ``settings.decode`` says (lossless too).

    The prompt is formatted as evaluation formats a source (``prompt_format``): a chat model gets it as its user
    turn, any other model ``prompt + dataset.separator`` (never cut: too long is refused), the format the shipped
    E2E adapters were trained on; without the separator they answered with EOS at once."""
    policy, decode = settings.policy, settings.decode
    fmt = prompt_format(cfg.dataset, lm.chat)
    prompt = build_prompt(cfg.prompt, fmt, lm.tokenizer, lm.chat)
    enc = lm.tokenizer([prompt], return_tensors="pt", add_special_tokens=prompt_special_tokens(lm.chat))
    enc = enc.to(lm.model.device)
    check_prompt_fits(decode, lm, enc["input_ids"].shape[1])
    # lossless decoding runs its own draft/verify rounds and takes no logits processors: no per-token bar there
    bar = progress_enabled(cfg) and decode.lossless is None
    start = time.perf_counter()
    with (progress_bar(decode.max_new_tokens, "Generating", enabled=bar) as tick,
          layer_skipping(lm.model, policy, max_new_tokens=decode.max_new_tokens, lossless=decode.lossless) as stats,
          torch.no_grad()):
        ticks = {} if decode.lossless else {"logits_processor": LogitsProcessorList([StepTick(tick)])}
        out = lm.model.generate(**enc, generation_config=decode.generation_config(lm.tokenizer), **ticks)
    seconds = time.perf_counter() - start
    new_ids = out[0, enc["input_ids"].shape[1]:].tolist()
    text = lm.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    # lossless: every token is the full model's (the drafts' cost is in the lossless entries); a one-token answer
    # has no decode step (the prefill writes the first token): no Avg. Layer rather than nan
    layers = float(lm.num_layers) if decode.lossless else stats.avg_layers
    layers = None if layers != layers else layers
    result = {"model": lm.name, "policy": policy.label, "prompt": cfg.prompt, "completion": text,
              "avg_layers": layers, "num_layers": lm.num_layers, "seconds": round(seconds, 3),
              "prompt_format": fmt, **decode.record(stats)}
    shown = f"{layers:.2f}" if layers is not None else "- (no decode step)"
    # logged, not printed: the console shows it and the run's log file (<run>/<task_name>.log) keeps it
    log.info("%s | %s | Avg. Layer %s of %d | %.2f s\n> %s\n%s", lm.name, policy.label, shown, lm.num_layers,
             seconds, cfg.prompt, text)
    if not text:
        log.warning("%s", empty_answer(new_ids, lm.tokenizer, fmt))
    return result


def finetune(cfg: DictConfig, lm: LoadedModel, module: CausalLMModule, resume: str | None) -> str:
    """Train; returns ``<run>/checkpoints/last.ckpt`` (a run that dies resumes from it: ckpt_path=... task=finetune)."""
    ft = cfg.finetune
    run_dir = Path(cfg.paths.output_dir)
    dm = HSDDataModule(cfg.dataset, lm.tokenizer, lm.chat, train_batch_size=ft.batch_size,
                       max_length=ft.max_length, train_limit=ft.train_limit, val_limit=ft.val_limit,
                       max_positions=lm.max_positions)
    dm.setup("fit")
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                                           every_n_train_steps=ft.checkpoint_every_n_steps or None)
    trainer = make_trainer(cfg, [ckpt_cb], run_dir, fit=True)
    if not dm.val_pairs:
        trainer.limit_val_batches = 0
    # Models load in eval mode and the module switches them to train mode when an epoch starts; Lightning checks
    # before that and warned "Found N module(s) in eval mode" on every fine-tuning: switch before fit instead
    module.model.train()
    with checkpoint_must_fit(resume, module, lm.name):
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
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
        if module.router is not None:  # SkipRouter.load(<run>/hf_model/router, model)
            module.router.save(export / "router")
        log.info("weights (safetensors): %s", export)
    return last


def evaluate(cfg: DictConfig, settings: RunSettings, lm: LoadedModel, module: CausalLMModule, policy: Policy,
             run_dir: Path, ckpt_path: str | None = None, restore: str | None = None,
             plain: dict | None = None) -> dict:
    """Decode the evaluation split with ``policy`` (as ``settings.decode`` says) into ``run_dir`` and score it.

    ``ckpt_path``: the checkpoint evaluated (run.json, metrics.json); ``restore``: the one Lightning loads into
    ``module`` first (None when its weights are already there); ``plain``: the metrics of the plain Full run of
    the same compare, which a lossless run's result line measures its speed against.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    done = {str(r["id"]) for r in read_run_predictions(run_dir)}  # resume: skip ids already written (any rank)
    check_resume_setting(run_dir, resume_key(cfg, policy.label, model=lm.name, ckpt_path=ckpt_path),
                         resuming=bool(done))
    check_resume_limit(run_dir, cfg.dataset.limit, len(done))
    if done:
        log.info("resuming: %d predictions already in %s", len(done), run_dir)
    decode = settings.decode
    dm = HSDDataModule(cfg.dataset, lm.tokenizer, lm.chat, eval_batch_size=decode.batch_size, skip_ids=done,
                       max_prompt_tokens=prompt_room(decode, lm))
    # what the report pairs runs on (with metrics' examples_hash)
    meta = recorded_setting(cfg, policy, model=lm.name, chat=lm.chat, num_layers=lm.num_layers, ckpt_path=ckpt_path)
    skip = SkipPolicyCallback(policy, decode, str(run_dir))
    preds = PredictionsCallback(str(run_dir), settings.bertscore, meta, skip=skip)  # skip: its lossless record
    # Warm-up first: one-time costs (allocator, first kernels) must not land in the first policy's tokens/s;
    # it runs once Lightning has put the model on this rank's device.
    callbacks = [WarmUpCallback(), skip, preds, TokenProgressCallback(decode.max_new_tokens)]
    trainer = make_trainer(cfg, callbacks, run_dir, run_name=wandb_run_name(policy.label, decode))
    try:
        with checkpoint_must_fit(restore, module, lm.name):
            trainer.test(module, datamodule=dm, ckpt_path=restore, verbose=False, weights_only=True)
        if not dm.test_examples:  # a resumed run with nothing left to generate
            preds.finish_without_loop(trainer, module)
    finally:
        finish_wandb()
    m = preds.metrics or {}
    if not trainer.is_global_zero:  # DDP: rank 0 scores every rank's predictions
        return m
    log.info("%s", result_line(policy.label, m, decode.lossless, plain))
    return m


def one_line(text: str) -> str:
    """A prediction on one line of the side-by-side view: its newlines shown as ``\\n``, as JSON writes them."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")


def print_comparison(out_dir: Path) -> None:
    """task=compare: the report table of the policies just run, plus a few predictions side by side."""
    from hsd_exp.report.runs import collect_runs
    from hsd_exp.report.tables import write_report

    paths = write_report(collect_runs([str(out_dir)]), out_dir)
    print("\n" + Path(paths["md"]).read_text())
    runs = sorted(p for p in out_dir.iterdir() if (p / PREDICTIONS_FILE).is_file())
    preds = {run.name: read_predictions(run / PREDICTIONS_FILE) for run in runs}
    first = next(iter(preds.values()), [])
    for i, rec in enumerate(first[:2]):
        print(f"input: {one_line(rec['source'])}\nreference: {one_line(rec['references'][0] if rec['references'] else '')}")
        for name, records in preds.items():
            print(f"  {name:>24}: {one_line(records[i]['prediction']) if i < len(records) else ''}")
        print()
    print(f"report: {paths['md']}  plot: {paths['png']}")
