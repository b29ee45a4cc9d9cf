"""The Lightning Trainer a task runs: ``conf/trainer`` + ``conf/callbacks`` + ``conf/logger``, and W&B run ends."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from hsd_exp.console import lightning_info_shown
from hsd_exp.errors import ConfigError
from hsd_exp.run_folder import flat_config


def world_size(trainer_cfg: DictConfig) -> int:
    """How many processes (ranks) ``trainer_cfg`` runs, as Lightning counts them; building a Trainer spawns nothing."""
    node = OmegaConf.to_container(trainer_cfg, resolve=True)
    node.update(logger=False, callbacks=[], enable_progress_bar=False, enable_checkpointing=False,
                enable_model_summary=False)
    with _quiet():  # the run's own Trainer prints the device banner
        return _instantiate(node).world_size


def make_trainer(cfg: DictConfig, callbacks: list, run_dir: Path, fit: bool = False,
                 run_name: str | None = None) -> pl.Trainer:
    """A Trainer writing into ``run_dir``: the config's callbacks after ``callbacks`` (the task's own), its loggers
    (``csv/eval`` when evaluating, so finetune_evaluate keeps its training curves in ``csv/``), the W&B run named
    ``run_name`` (task=compare: each policy's label) and offline when W&B finds no API key."""
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    static = [instantiate(c) for c in cfg.callbacks.values()]
    if not node.get("enable_progress_bar", True):  # trainer.enable_progress_bar=false wins over the bar
        static = [c for c in static if not isinstance(c, pl.callbacks.ProgressBar)]
    loggers = [_logger(name, lg, run_dir, fit, run_name) for name, lg in cfg.logger.items()]
    if loggers:
        hyperparams = logged_config(cfg, evaluates=not fit or cfg.task == "finetune_evaluate")
        for lg in loggers:
            lg.log_hyperparams(hyperparams)
    _INTERRUPTED.clear()  # each Trainer starts uninterrupted (an interrupted one ends the process)
    node.update(callbacks=[*callbacks, *static, InterruptWatch()], logger=loggers or False,
                default_root_dir=str(run_dir))
    if not fit:
        node["enable_checkpointing"] = False
    # Lightning's model summary (12 lines, RichModelSummary prints past logging) is INFO: shown with -v only
    if fit and "enable_model_summary" not in node and not lightning_info_shown():
        node["enable_model_summary"] = False
    return _instantiate(node)


def logged_config(cfg: DictConfig, evaluates: bool) -> dict:
    """The run's config as the loggers record it: flat, resolved, and ``bertscore.model`` the backbone that will
    score (``resolve_bertscore_backbone``: roberta-large when it is cached or downloadable, else the offline
    fallback all-MiniLM-L6-v2), not the one the config asks for first; ``bertscore.requested`` keeps that."""
    config = flat_config(OmegaConf.to_container(cfg, resolve=True))
    if evaluates and config.get("bertscore.enabled"):
        from hsd_exp.eval.metrics import resolve_bertscore_backbone

        config["bertscore.requested"] = config.get("bertscore.model")
        bertscore = OmegaConf.to_container(cfg.bertscore, resolve=True)
        config["bertscore.model"] = resolve_bertscore_backbone(bertscore)[2]  # its recorded name, as metrics.json
    return config


def wandb_run_name(label: str, decode) -> str:
    """A run's W&B name: the policy's label, plus the decoding mode when it is not the policy's own tokens
    (``decode=lossless``: the policy only drafted), so a lossless and a plain run of one policy tell apart."""
    lossless = getattr(decode, "lossless", None)
    if lossless is None:
        return label
    conf = f",c={lossless.draft_confidence:g}" if lossless.draft_confidence is not None else ""
    return f"{label} lossless(k={lossless.draft_len}{conf})"


_INTERRUPTED: list[bool] = []


class InterruptWatch(pl.Callback):
    """Lightning turns Ctrl-C inside fit/test into ``sys.exit(1)``: record it, so the entry point can tell a user's
    interrupt from a failure and say how to resume."""

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt):
            _INTERRUPTED.append(True)


def interrupted() -> bool:
    """Whether a Trainer of this process was stopped by Ctrl-C."""
    return bool(_INTERRUPTED)


def _logger(name: str, node: DictConfig, run_dir: Path, fit: bool, run_name: str | None):
    node = OmegaConf.to_container(node, resolve=True)
    node["save_dir"] = str(run_dir)
    if name == "csv" and not fit:
        node["version"] = "eval"
    if name == "wandb":
        if node.get("offline") is None:
            node["offline"] = not wandb_logged_in()
        if node["offline"]:  # WandbLogger's own switch (WANDB_MODE) comes after wandb.login() has set up W&B
            node.setdefault("mode", "offline")  # online, so wandb.init would ask for the key it has not got
        if run_name:
            node["name"] = run_name
    return instantiate(node)


def wandb_logged_in() -> bool:
    """W&B's own credential lookup (WANDB_API_KEY, settings, .netrc); never prompts, never goes online."""
    import wandb

    return bool(wandb.login(prompt=False, verify=False))


def finish_wandb() -> None:
    """End the W&B run this job opened, if any.

    WandbLogger reuses a run still open in the process, and Hydra's basic launcher runs a multirun's jobs in one
    process (task=compare: every policy in one job): each evaluation would log into the first one's run.
    """
    wandb = sys.modules.get("wandb")  # imported only when logger=wandb made a run
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    settings = getattr(run, "settings", None)
    offline, sync_dir = getattr(settings, "_offline", False), getattr(settings, "sync_dir", None)
    url = None if offline else getattr(run, "url", None)
    wandb.finish()
    # W&B's own banner is silenced (console.quiet_libraries): say where the run went, in one line
    if offline and sync_dir:
        logging.getLogger(__name__).info("W&B: offline run in %s; upload it with `wandb sync %s`", sync_dir, sync_dir)
    elif url:
        logging.getLogger(__name__).info("W&B: %s", url)


def _instantiate(node: dict) -> pl.Trainer:
    try:
        return instantiate(node)
    except InstantiationException as err:  # Lightning's own refusal of the setting: one line, no traceback
        if not isinstance(err.__cause__, MisconfigurationException):
            raise
        setting = ", ".join(f"trainer.{k}={node.get(k)}" for k in ("accelerator", "devices", "strategy", "precision"))
        raise ConfigError(f"{setting}: {str(err.__cause__).splitlines()[0]} Choose a setting this machine runs, "
                          "e.g. trainer=cpu") from None


@contextmanager
def _quiet():
    lg = logging.getLogger("pytorch_lightning")
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)
