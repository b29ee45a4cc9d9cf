"""SkipLayer's router trained through the Lightning module: the density loss pulls the run rate toward P, the
router goes into the checkpoint (beside a LoRA adapter, or alone on a frozen backbone) and policy=skiplayer
evaluates it; a run that cannot work stops before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hsd_exp import preflight, tasks
from hsd_exp.errors import ConfigError
from hsd_exp.eval.layer_map import RATES_FILE, RATES_PLOT
from hsd_exp.skip.router import SkipRouter

from helpers import compose_config

BASE = ["model=tiny-llama", "dataset.path=sample", "bertscore.enabled=false", "decode.max_new_tokens=8",
        "dataset.limit=4", "finetune.batch_size=4", "finetune.train_limit=32", "finetune.max_length=96",
        "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "logger=csv", "callbacks=none",
        "finetune.router=true", "router.kind=linear", "router.density=0.5", "router.lr=0.05", "policy=skiplayer"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp: Path, *overrides: str):
    return compose_config(tmp, *BASE, *overrides)


@pytest.mark.parametrize("mode", ["lora", "none"])
def test_router_trains_toward_the_density_is_saved_and_evaluates(tmp_path, mode):
    out = tasks.run(make_cfg(tmp_path / "ft", "task=finetune_evaluate", f"finetune={mode}", "trainer.max_steps=30"))
    assert 0 < out["avg_layers"] < 6  # the trained router skips at decode time
    ckpt = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert ckpt["hsd_router"]["num_layers"] == 6 and any(k.startswith("router.gates.") for k in keys)
    assert all(k.startswith("router.") or "lora_" in k for k in keys)  # trained weights only
    if mode == "none":
        assert all(k.startswith("router.") for k in keys)  # the frozen backbone stays out
    metrics = (tmp_path / "ft" / "csv" / "metrics.csv").read_text().splitlines()
    header, rows = metrics[0].split(","), [r.split(",") for r in metrics[1:]]
    rates = [float(r[header.index("train/run_rate")]) for r in rows if r[header.index("train/run_rate")]]
    assert rates[0] > 0.9 and abs(rates[-1] - 0.5) < abs(rates[0] - 0.5)  # pulled from dense toward P
    router = SkipRouter.load(tmp_path / "ft" / "hf_model" / "router")
    assert router.num_layers == 6
    again = tasks.run(make_cfg(tmp_path / "ev", "task=evaluate", f"finetune={mode}",
                               f"ckpt_path={tmp_path / 'ft' / 'checkpoints' / 'last.ckpt'}"))
    assert again["avg_layers"] == pytest.approx(out["avg_layers"])  # the same router, restored by Lightning
    full = tasks.run(make_cfg(tmp_path / "full", "task=evaluate", f"finetune={mode}", "policy=full",
                              f"ckpt_path={tmp_path / 'ft' / 'checkpoints' / 'last.ckpt'}"))
    assert full["avg_layers"] == 6  # the same checkpoint at full depth: its router is left out
    layer_map = json.loads((tmp_path / "ev" / RATES_FILE).read_text())  # which layers ran at which token
    assert (tmp_path / "ev" / RATES_PLOT).read_bytes().startswith(b"\x89PNG")
    assert len(layer_map["by_token"]) == 6 and 1 <= len(layer_map["by_token"][0]) <= 7  # T = 0 .. Tmax-2
    rates = list(layer_map["per_layer"].values())
    assert all(0 <= r <= 1 for r in rates) and 0 < sum(rates) < 6


def test_skiplayer_without_a_router_stops_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="policy=skiplayer needs a trained router"):
        preflight.check(make_cfg(tmp_path / "a", "task=evaluate", "finetune.router=false"))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "pytorch-lightning_version": "2.6.0"}, plain)
    with pytest.raises(ConfigError, match="holds no router"):
        preflight.check(make_cfg(tmp_path / "b", "task=evaluate", "finetune=full", "finetune.router=false",
                                 f"ckpt_path={plain}"))
    with pytest.raises(ConfigError, match=r"router.density=1.5 is out of range"):
        preflight.check(make_cfg(tmp_path / "c", "task=finetune", "finetune=lora", "router.density=1.5"))
    with pytest.raises(ConfigError, match="router.kind=deep is unknown"):
        preflight.check(make_cfg(tmp_path / "d", "task=finetune", "finetune=lora", "router.kind=deep"))
    preflight.check(make_cfg(tmp_path / "e", "task=finetune", "finetune=none"))  # the router alone: fine
    router_only = tmp_path / "router.ckpt"
    shape = SkipRouter(num_layers=12, hidden_size=64).config
    torch.save({"state_dict": {"router.gates.0.net.0.weight": torch.zeros(1)}, "hsd_adapter_only": True,
                "hsd_router": shape, "pytorch-lightning_version": "2.6.0"}, router_only)
    with pytest.raises(ConfigError, match="holds a router only .*evaluate it with finetune=none"):
        preflight.check(make_cfg(tmp_path / "f", "task=evaluate", "finetune=lora", "finetune.router=false",
                                 f"ckpt_path={router_only}"))
    with pytest.raises(ConfigError, match="holds a router for 12 layers, but model.num_layers=6"):
        preflight.check(make_cfg(tmp_path / "g", "task=evaluate", "finetune=none", "finetune.router=false",
                                 f"ckpt_path={router_only}"))
