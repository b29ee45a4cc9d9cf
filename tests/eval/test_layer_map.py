"""The layer map of a per-token policy: the JSON's per-layer means (tokens a layer never saw left out), the heat map
as a PNG, and what goes to the loggers (metrics always, the image only where a logger takes images)."""

import json
import math

from hsd_exp.eval.layer_map import RATES_FILE, RATES_PLOT, log_layer_map, write_layer_map

NAN = float("nan")
RATES = [[1.0, 1.0, 1.0], [0.5, 0.0, NAN], [NAN, NAN, NAN]]  # (L, Tmax): layer 3 never decoded a token


def test_the_map_is_written_as_json_and_a_heat_map(tmp_path):
    per_layer = write_layer_map(tmp_path, RATES, "SkipLayer (threshold=0.5): layers run per token")
    assert per_layer[1] == 1.0 and per_layer[2] == 0.25  # the mean over the tokens it saw: (0.5 + 0) / 2
    assert math.isnan(per_layer[3]) and list(per_layer) == [1, 2, 3]  # 1-indexed layers
    saved = json.loads((tmp_path / RATES_FILE).read_text().replace("NaN", "null"))
    assert saved["by_token"][0] == [1.0, 1.0, 1.0] and saved["by_token"][1][:2] == [0.5, 0.0]
    assert saved["per_layer"] == {"1": 1.0, "2": 0.25, "3": None} and "share of rows" in saved["what"]
    assert (tmp_path / RATES_PLOT).read_bytes().startswith(b"\x89PNG")


class Logger:
    def __init__(self, images: bool):
        self.metrics, self.images = [], []
        if images:
            self.log_image = lambda key, images, step: self.images.append((key, images, step))

    def log_metrics(self, metrics, step):
        self.metrics.append((metrics, step))


def test_loggers_get_the_rates_and_image_loggers_the_heat_map(tmp_path):
    csv, wandb = Logger(images=False), Logger(images=True)
    log_layer_map([csv, wandb], tmp_path, {1: 1.0, 2: 0.25, 3: NAN}, step=7)
    for logger in (csv, wandb):
        assert logger.metrics == [({"test/run_rate_l1": 1.0, "test/run_rate_l2": 0.25}, 7)]  # NaN left out
    assert not csv.images
    assert wandb.images == [("router/layer_run_rates", [str(tmp_path / RATES_PLOT)], 7)]
