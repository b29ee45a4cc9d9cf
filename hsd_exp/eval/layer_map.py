"""Which layers a per-token policy ran: the share of rows that ran layer l at generated token T, as a file, a heat
map and W&B entries. SkipLayer's router decides per token, so this is what it learned to keep."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hsd_exp.run_folder import RATES_FILE, RATES_PLOT


def write_layer_map(run_dir: Path, rates: list[list[float]], title: str) -> dict:
    """``rates`` (L, Tmax) from SkipStats.run_rates(): writes the JSON and the heat map; returns the per-layer
    run rate over every decoded token (layer l, 1-indexed -> rate)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_layer = {}
    for i, row in enumerate(rates, 1):
        seen = [r for r in row if not math.isnan(r)]
        per_layer[i] = sum(seen) / len(seen) if seen else float("nan")
    (run_dir / RATES_FILE).write_text(json.dumps(
        {"what": "share of rows (batch x beams) that ran layer l (1-indexed) at generated token T, over the "
                 "decode steps this process ran (a resumed run: its new tokens only); rows already finished "
                 "(padding after EOS) are counted as the batch decodes them",
         "per_layer": per_layer, "by_token": rates}, indent=1) + "\n")
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rates, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                      extent=(-0.5, len(rates[0]) - 0.5, 0.5, len(rates) + 0.5))
    fig.colorbar(image, ax=ax, label="share of rows that ran the layer")
    ax.set_xlabel("generated token T")
    ax.set_ylabel("decoder layer (1 = bottom)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(run_dir / RATES_PLOT, dpi=120)
    return per_layer


def log_layer_map(loggers, run_dir: Path, per_layer: dict, step: int) -> None:
    """The per-layer run rates as metrics, and the heat map as an image where the logger takes images (W&B)."""
    for logger in loggers:
        logger.log_metrics({f"test/run_rate_l{i}": r for i, r in per_layer.items() if not math.isnan(r)}, step=step)
        if hasattr(logger, "log_image"):
            logger.log_image(key="router/layer_run_rates", images=[str(run_dir / RATES_PLOT)], step=step)


__all__ = ["RATES_FILE", "RATES_PLOT", "log_layer_map", "write_layer_map"]
