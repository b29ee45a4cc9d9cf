"""Preflight: bad decoding values, a model brought by path, SkipLayer's router and the offline order, all refused
before a model loads.

model=phi2 is neither cached nor downloadable here (tests run offline): a check that passed would end on phi-2's
offline error instead, so a case that names its own value proves its check came first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hsd_exp import preflight, tasks
from hsd_exp.errors import ConfigError
from hsd_exp.models import loading as models
from hsd_exp.skip.router import SkipRouter

from helpers import compose_config, load

BASE = ["bertscore.enabled=false", "trainer.accelerator=cpu", "callbacks=none"]


def cfg_of(tmp: Path, *overrides: str):
    return compose_config(tmp, *BASE, *overrides)


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize(("overrides", "expected"), [
    (["decode.num_beams=0"], "decode.num_beams=0"),
    (["dataset.max_new_tokens=0"], "dataset.max_new_tokens=0"),
    (["decode.max_new_tokens=0"], "decode.max_new_tokens=0"),
    (["decode.batch_size=0"], "decode.batch_size=0"),
    (["decode=sample", "decode.temperature=0"], "decode.temperature=0"),
    (["decode=sample", "decode.top_p=0"], "decode.top_p=0"),
    (["decode=sample", "decode.top_p=1.5"], "decode.top_p=1.5"),
    (["decode.repetition_penalty=0"], "decode.repetition_penalty=0"),
], ids=["beams", "dataset-max-new", "decode-max-new", "batch-size", "temperature", "top-p-0", "top-p-1.5", "penalty"])
@pytest.mark.parametrize("task", ["evaluate", "generate"])
def test_bad_decoding_values_are_refused_before_the_model_loads(tmp_path, overrides, expected, task):
    """They used to pass preflight and end in a traceback from generate() after the model had loaded."""
    with pytest.raises(ConfigError) as err:
        tasks.run(cfg_of(tmp_path, f"task={task}", "model=phi2", "dataset.path=sample", *overrides))
    msg = str(err.value)
    assert expected in msg and "set " in msg and "\n" not in msg, msg
    assert "microsoft/phi-2" not in msg


@pytest.mark.parametrize("task", ["evaluate", "generate"])
@pytest.mark.parametrize("policy", [["policy=full"], ["policy=skipdecode", "policy.min=6", "policy.max=6"]])
def test_lossless_drafting_with_the_full_model_is_refused(tmp_path, task, policy):
    """Every draft accepted, each round k full forwards plus a verification: decode=greedy's output, slower."""
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg_of(tmp_path, f"task={task}", "model=tiny-llama", "dataset.path=sample", *policy,
                               "decode=lossless"))
    msg = str(err.value)
    assert "drafts with the full model" in msg and "decode=greedy" in msg and "\n" not in msg, msg
    preflight.check(cfg_of(tmp_path, f"task={task}", "model=tiny-llama", "dataset.path=sample", "policy=hsd",
                           "policy.max=4", "decode=lossless"))  # a draft that skips: fine


# ---------------------------------------------------------------------------------------------- model.path
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    """tiny-llama (6 layers) written by save_pretrained, as fine-tuning exports it."""
    lm = load("tiny-llama")
    out = tmp_path_factory.mktemp("tiny-llama-6")
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type,says", [("qwen2", "set model.family=qwen2"),
                                             ("mamba", "hsd_exp/models/layout.py")])
def test_model_path_family_is_named_before_the_policy(tmp_path, model_type, says):
    """A Qwen2 folder through model=gpt2 (L=12): first "policy.max=18 must be <= L=12", then "family" took two round
    trips; the family decides everything else, so it comes first (a family the engine cannot serve too)."""
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 24}))
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg_of(tmp_path, "model=gpt2", f"model.path={folder}", "policy=hsd_s1_max18"))
    msg = str(err.value)
    assert f"'{model_type}'" in msg and says in msg and "policy.max" not in msg, msg


def test_model_path_depth_comes_from_its_config(tmp_path, saved_llama, monkeypatch):
    """model=smollm2-135m (L=30) with a 6-layer folder: the policy is checked against 6 and the model builds with
    num_layers=6, with no model.num_layers=6 to add by hand."""
    with pytest.raises(ConfigError, match=r"policy.max=18.*L=6"):
        preflight.check(cfg_of(tmp_path, "model=smollm2-135m", f"model.path={saved_llama}", "policy=hsd_s1_max18"))
    cfg = cfg_of(tmp_path, "model=smollm2-135m", f"model.path={saved_llama}", "model.chat=false",
                 "model.device=cpu", "model.dtype=float32", "task=generate", "policy=hsd", "policy.s=1",
                 "policy.min=0", "policy.max=4", "decode.max_new_tokens=4")
    assert preflight.check(cfg).num_layers == 6
    out = tasks.run(cfg)
    assert out["num_layers"] == 6 and out["avg_layers"] < 6


def test_model_path_family_is_checked_before_weights_load(tmp_path, saved_llama, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("weights loaded before the config was checked")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(ConfigError, match="model.family=gpt2"):
        tasks.run(cfg_of(tmp_path, "model=gpt2", f"model.path={saved_llama}", "policy=full"))


def test_model_path_without_tokenizer_files_is_named_before_weights_load(tmp_path, saved_llama, monkeypatch):
    """It failed inside transformers' AutoTokenizer, behind a Hydra wrapper, after the weights had loaded."""
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in saved_llama.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (weights_only / f.name).symlink_to(f)

    def boom(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizer files were checked")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(ConfigError) as err:
        tasks.run(cfg_of(tmp_path, "task=generate", "model=smollm2-135m", f"model.path={weights_only}",
                         "model.chat=false", "policy=full", "decode.max_new_tokens=4"))
    msg = str(err.value)
    assert f"model.path={weights_only} has no tokenizer files" in msg and "save_pretrained" in msg, msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------- order
def test_offline_model_is_named_before_the_hub_dataset(tmp_path):
    """+experiment=phi2_xsum offline: phi-2 (the bigger download) is named, not XSum."""
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg_of(tmp_path, "+experiment=phi2_xsum", "trainer=cpu"))
    msg = str(err.value)
    assert "microsoft/phi-2" in msg and "xsum" not in msg.lower(), msg


def test_local_mistakes_still_come_before_the_offline_model(tmp_path):
    with pytest.raises(ConfigError, match="nosuch"):
        preflight.check(cfg_of(tmp_path, "task=evaluate", "model=phi2", "dataset.path=sample", "dataset.split=nosuch"))


# ---------------------------------------------------------------------------------------------- SkipLayer's router
ROUTER = ["model=tiny-llama", "dataset.path=sample", "decode.max_new_tokens=8", "dataset.limit=4",
          "finetune.batch_size=4", "finetune.train_limit=32", "finetune.max_length=96", "logger=csv",
          "finetune.router=true", "router.kind=linear", "router.density=0.5", "router.lr=0.05", "policy=skiplayer"]


def test_skiplayer_without_a_router_stops_before_the_model_loads(tmp_path):
    def make_cfg(tmp, *overrides):
        return cfg_of(tmp, *ROUTER, *overrides)

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
