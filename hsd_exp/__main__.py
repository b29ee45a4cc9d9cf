"""``python -m hsd_exp [overrides]``: the Hydra entry point (see README for the commands).

``-v`` (= ``hydra.verbose=hsd_exp``) or any ``hydra.verbose`` keeps the libraries' boilerplate (``console.py``).
A config-group value that names no file (``policy=hds``) is one ``error:`` line with the group's choices
(``check_group_choices``, before Hydra composes); an evaluation ends with its run folder and the report command.
"""

from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import hsd_exp  # noqa: F401  (registers the ${hsd_root:} resolver)
from hsd_exp.errors import ConfigError, exit_on_config_error

CONF = Path(__file__).resolve().parents[1] / "conf"
VERBOSE_FLAGS = ("-v", "--verbose")
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report Ctrl-C


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hsd_exp.console import REPORTED_TASKS, quiet_libraries, report_hint
    from hsd_exp.tasks import run
    from hsd_exp.train import trainer

    quiet_libraries(HydraConfig.get().verbose)
    with exit_on_config_error():  # bad input: one line, no stack trace
        try:
            result = run(cfg)
        except KeyboardInterrupt:  # Ctrl-C outside Lightning's loops (loading, scoring)
            interrupted(cfg)
        except SystemExit:  # Lightning turns Ctrl-C inside fit/test into sys.exit(1)
            if trainer.interrupted():
                interrupted(cfg)
            raise
    from pytorch_lightning.utilities import rank_zero_only

    # where the run went and what to run next (a multirun's hint comes at its end: console.ReportHint); DDP: rank 0
    if cfg.task in REPORTED_TASKS and HydraConfig.get().mode != RunMode.MULTIRUN and rank_zero_only.rank == 0:
        logging.getLogger("hsd_exp").info("%s", report_hint(HydraConfig.get().runtime.output_dir))
    return objective(result, cfg.get("avg_layer_budget"))


def interrupted(cfg: DictConfig) -> None:
    """Exit 130 with one line: how to resume what was interrupted (predictions and checkpoints are kept)."""
    print(f"interrupted: {resume_hint(cfg)}", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT)


def resume_hint(cfg: DictConfig) -> str:
    if cfg.task == "generate":
        return "nothing to resume (task=generate); rerun the command"
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:  # the sweep folder (hydra.sweep.dir itself would resolve ${now:} anew)
        return (f"rerun the same command with hydra.sweep.dir={run_dir.parent} to resume: finished runs are kept, "
                "an interrupted one continues from its predictions")
    if cfg.task in ("finetune", "finetune_evaluate"):
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return (f"no checkpoint was saved yet in {run_dir} (finetune.checkpoint_every_n_steps); rerun the "
                    "command to start again")
        return f"rerun the same command with hydra.run.dir={run_dir} ckpt_path={last} to resume from its last checkpoint"
    return (f"rerun the same command with hydra.run.dir={run_dir} to resume: the predictions already written are "
            "kept")


# ROUGE-L is at most 100: an over-budget score (ROUGE-L - 100 - penalty, penalty > 0) is below 0, and so below
# every in-budget score (ROUGE-L >= 0). A bare penalty let a slightly over-budget run beat an in-budget one.
OVER_BUDGET_OFFSET = 100.0


def objective(result, budget: float | None) -> float | None:
    """What sweepers (Optuna) maximise: ROUGE-L within the Avg. Layer budget; over it,
    ROUGE-L - 100 - 100 * (Avg. Layer - budget) / L, which is negative, so every run over the budget ranks
    below every run within it, and among runs over it the search still moves towards fewer layers."""
    if not isinstance(result, dict) or not isinstance(result.get("rougeL"), int | float):
        return None
    score = float(result["rougeL"])
    layers, total = result.get("avg_layers"), result.get("num_layers")
    if budget is not None and isinstance(layers, int | float) and layers > budget:
        score -= OVER_BUDGET_OFFSET + 100.0 * (layers - budget) / (total or layers)
    return score


def expand_verbose(argv: list[str]) -> list[str]:
    """``-v`` / ``--verbose`` -> ``hydra.verbose=hsd_exp`` (Hydra's parser knows neither flag)."""
    return ["hydra.verbose=hsd_exp" if a in VERBOSE_FLAGS else a for a in argv]


def check_group_choices(argv: list[str], conf: Path = CONF) -> None:
    """ConfigError for an override that picks a config-group member with no file (``policy=hds``, ``model=smollm2``,
    ``+experiment=nope``; each value of a sweep): one line naming the value and the group's choices, where Hydra
    would print its whole search path and every group's members. Groups are the folders of ``conf/`` (Hydra's own
    ``hydra/...`` groups and a command line with its own search path are left to Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith(("hydra.searchpath", "--config-dir", "-cd", "--config-path", "-cp")) for a in argv):
        return
    for arg in (a for a in argv if not a.startswith("-") and "=" in a):
        try:
            override = OverridesParser.create().parse_overrides([arg])[0]
            group = override.key_or_group
            if "." in group or group.startswith("hydra") or not (conf / group).is_dir() or override.is_delete():
                continue
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # noqa: BLE001 - globs, ranges, bad syntax: Hydra's own message says it best
            continue
        choices = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        key = arg.split("=", 1)[0]  # as typed: +experiment, policy
        for value in (v for v in values if isinstance(v, str) and v not in choices):
            near = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {key}={near[0]}?)" if near else ""
            raise ConfigError(f"{key}={value} is not in conf/{group}/{hint}; choose one of {', '.join(choices)}")


if __name__ == "__main__":
    sys.argv[1:] = expand_verbose(sys.argv[1:])  # also what Lightning's DDP relaunch of the other ranks reads
    with exit_on_config_error():
        check_group_choices(sys.argv[1:])
    main()
