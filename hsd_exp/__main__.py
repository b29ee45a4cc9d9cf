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
    # For sweepers (Optuna): the objective is the main quality metric when there is one.
    if isinstance(result, dict) and isinstance(result.get("rougeL"), int | float):
        return float(result["rougeL"])
    return None


if __name__ == "__main__":
    main()
