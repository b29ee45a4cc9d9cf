"""``python -m hsd_exp [overrides]``: the Hydra entry point (see README for the commands)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

import hsd_exp  # noqa: F401  (registers the ${hsd_root:} resolver)
from hsd_exp.errors import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hsd_exp.tasks import run

    try:
        result = run(cfg)
    except ConfigError as err:  # bad input: one line, no stack trace
        logging.getLogger("hsd_exp").debug("config error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return objective(result, cfg.get("avg_layer_budget"))


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


if __name__ == "__main__":
    main()
