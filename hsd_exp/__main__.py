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


def objective(result, budget: float | None) -> float | None:
    """What sweepers (Optuna) maximise: ROUGE-L, minus 100 * (Avg. Layer - budget) / L over the budget."""
    if not isinstance(result, dict) or not isinstance(result.get("rougeL"), int | float):
        return None
    score = float(result["rougeL"])
    layers, total = result.get("avg_layers"), result.get("num_layers")
    if budget is not None and isinstance(layers, int | float) and total and layers > budget:
        score -= 100.0 * (layers - budget) / total
    return score


if __name__ == "__main__":
    main()
