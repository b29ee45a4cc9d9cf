"""RunSettings: the config parsed once (policies, decode settings, depth, ranks), what a checkpoint holds, and where
SkipLayer's router comes from (the checkpoint wins over the router saved beside model.adapter)."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from hsd_exp.errors import ConfigError
from hsd_exp.models.shipped import WEIGHTS
from hsd_exp.run_settings import CheckpointInfo, RunSettings, read_checkpoint, router_source

from helpers import compose_config

BASE = ["bertscore.enabled=false", "trainer.accelerator=cpu", "callbacks=none"]
FULL = "{_target_:hsd_exp.build_policy,name:full}"
HSD = "{_target_:hsd_exp.build_policy,name:hsd,s:1,min:0,max:4}"


def test_the_config_is_parsed_into_what_the_tasks_run_on(tmp_path):
    cfg = compose_config(tmp_path, *BASE, "model=tiny-llama", "task=compare", f"compare_policies=[{FULL},{HSD}]",
                         "policy=hsd", "policy.max=3", "decode=lossless", "decode.draft_len=2")
    run = RunSettings.from_config(cfg)
    assert run.task == "compare" and run.world_size == 1 and run.num_layers == 6
    assert run.policy.label == "hsd(s=1,0,3)" and [p.label for p in run.compare] == ["full", "hsd(s=1,0,4)"]
    assert [p.label for p in run.policies] == ["hsd(s=1,0,3)", "full", "hsd(s=1,0,4)"]
    assert run.decode.lossless.draft_len == 2 and run.decode.batch_size == cfg.decode.batch_size
    assert run.checkpoint is None and run.router is None and not run.trains_router
    assert run.bertscore["device"] == "cpu"  # device=auto under trainer.accelerator=cpu


def test_an_unknown_task_is_named_before_anything_else_is_parsed(tmp_path):
    with pytest.raises(ConfigError, match="task=nope is unknown"):
        RunSettings.from_config(compose_config(tmp_path, *BASE, "task=nope", "decode.batch_size=0"))


def test_a_checkpoint_is_read_once_for_what_it_holds(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.a.lora_A.weight": torch.zeros(1)}, "hsd_adapter_only": True,
                "hsd_router": {"num_layers": 6}, "pytorch-lightning_version": pl.__version__}, ckpt)
    assert read_checkpoint(str(ckpt)) == CheckpointInfo(str(ckpt), True, True, {"num_layers": 6})
    for name, content, says in (("gone.ckpt", None, "does not exist"), ("notes.ckpt", "text", "not a torch.save"),
                                ("plain.ckpt", {"weights": 1}, "no state_dict or version")):
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(ConfigError, match=f"ckpt_path={path} .*{says}"):
            read_checkpoint(str(path))


def test_the_router_comes_from_the_checkpoint_else_from_beside_the_adapter():
    with_router = CheckpointInfo("run/last.ckpt", True, False, {"num_layers": 6})
    source = router_source(with_router, "smollm2_e2e_skiplayer")  # the checkpoint wins
    assert (source.named_by, source.shape, source.folder) == ("ckpt_path=run/last.ckpt", {"num_layers": 6}, None)
    assert router_source(CheckpointInfo("x.ckpt", False, False, None), None).shape is None  # no router in it
    shipped = router_source(None, "smollm2_e2e_skiplayer")
    folder = WEIGHTS / "smollm2_e2e_skiplayer" / "router"
    assert shipped.folder == folder and shipped.shape == json.loads((folder / "router.json").read_text())
    assert shipped.named_by == "model.adapter=smollm2_e2e_skiplayer"
    assert router_source(None, "smollm2_e2e_robust") is None and router_source(None, None) is None


def test_a_router_in_training_does_not_start_from_the_adapters(tmp_path):
    """finetune.router=true trains its own router: the one shipped beside model.adapter is not its start."""
    cfg = compose_config(tmp_path, *BASE, "+experiment=demo_skiplayer", "task=finetune_evaluate", "finetune=lora",
                         "finetune.router=true")
    run = RunSettings.from_config(cfg)
    assert run.trains_router and run.router is None
    assert RunSettings.from_config(compose_config(tmp_path, *BASE, "+experiment=demo_skiplayer")).router.folder
