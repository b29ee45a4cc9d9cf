"""Shipped weights (hsd_exp.models.shipped, hsd_exp/weights/): model.adapter resolves, merges, and the shipped skip-robust
SmolLM2 loads offline and decodes readable text under its headline setting."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from hsd_exp import layer_skipping
from hsd_exp.data.prompts import build_prompt
from hsd_exp.errors import ConfigError
from hsd_exp.models.loading import load_model
from hsd_exp.models.shipped import WEIGHTS, adapter_router, resolve_adapter, shipped

from helpers import compose_config

TINY = {"name": "tiny-llama", "family": "llama", "source": "tiny", "tiny": {"layers": 4, "hidden": 64, "heads": 4}}


def test_a_bad_adapter_names_the_value_and_what_is_shipped(tmp_path):
    with pytest.raises(ConfigError, match=r"model.adapter=nope is neither a shipped adapter \(smollm2_e2e_robust"):
        resolve_adapter("nope")
    with pytest.raises(ConfigError, match=f"model.adapter={tmp_path} is neither"):
        resolve_adapter(str(tmp_path))
    assert resolve_adapter("smollm2_e2e_robust") == WEIGHTS / "smollm2_e2e_robust"


def test_the_cli_refuses_a_bad_adapter_before_the_model_loads(tmp_path):
    from hsd_exp import preflight

    cfg = compose_config(tmp_path, "model=tiny-llama", "dataset.path=sample", "+model.adapter=missing_adapter")
    with pytest.raises(ConfigError, match="model.adapter=missing_adapter"):
        preflight.check(cfg)


def test_an_adapter_directory_is_merged_into_the_weights(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(**TINY, cache_dir=str(tmp_path))
    peft = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        merged = load_model(**TINY, cache_dir=str(tmp_path), adapter=str(tmp_path / "adapter"))
        plain = load_model(**TINY, cache_dir=str(tmp_path))
        got, before = merged.model(input_ids=ids).logits, plain.model(input_ids=ids).logits
    assert "lora" not in "".join(n for n, _ in merged.model.named_modules())  # merged: a plain model again
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, before, atol=1e-3)


def test_the_shipped_adapters_have_a_card_and_stay_small():
    assert {"smollm2_e2e_robust", "smollm2_e2e_skiplayer"} <= set(shipped())
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 16 * 2**20
    for name in shipped():
        card = (WEIGHTS / name / "README.md").read_text()
        for what in ("python -m hsd_exp", "Budget", "Licen", "Data"):
            assert what in card, f"{name}'s card says nothing about {what}"


@pytest.mark.slow
def test_the_shipped_skip_robust_smollm2_loads_offline_and_reads_well_at_its_headline_setting(tmp_path):
    """The headline is the card's setting (layers 1-6 and 19-30, by its layer list); each decode step runs exactly
    those 18 layers (counted by hooks on the layers' MLPs), so Avg. Layer is 18.0; the adapter changes the base
    model's outputs; full depth and the headline both write the MR's name and type."""
    cfg = compose_config(tmp_path, "+experiment=smollm2_e2e_robust", "dataset.path=sample")
    lm = instantiate(cfg.model)
    assert lm.num_layers == 30 and cfg.model.adapter == "smollm2_e2e_robust"
    headline, tmax = instantiate(cfg.policy), int(cfg.decode.max_new_tokens)
    card = set(range(0, 6)) | set(range(18, 30))  # 0-based: layers 1-6 and 19-30
    assert all(set(headline.layers(t, tmax, 30)) == card for t in range(tmax))
    prompt = build_prompt("name[Blue Spice], eatType[coffee shop], area[city centre]", cfg.dataset, lm.tokenizer,
                          lm.chat)
    enc = lm.tokenizer([prompt], return_tensors="pt")
    kw = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": lm.tokenizer.pad_token_id}
    steps = []  # per forward: the layers whose MLP ran (a skipped layer returns its input, its MLP never runs)
    layers = lm.model.model.layers
    handles = [lm.model.register_forward_pre_hook(lambda m, a: steps.append(set()))]
    handles += [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: steps[-1].add(i))
                for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            full = lm.model.generate(**enc, **kw)
            steps.clear()
            with layer_skipping(lm.model, headline, max_new_tokens=tmax) as stats:
                skipped = lm.model.generate(**enc, **kw)
    finally:
        for h in handles:
            h.remove()
    new = skipped.shape[1] - enc["input_ids"].shape[1]
    assert steps[0] == set(range(30)) and len(steps) == new  # the prefill runs every layer, then one step a token
    assert all(s == card for s in steps[1:])
    assert stats.avg_layers == 18.0
    texts = [lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) for out in (full, skipped)]
    for text in texts:  # readable: the restaurant's name and what it is, in a sentence
        assert "Blue Spice" in text and "coffee shop" in text, texts
    base = instantiate(cfg.model, adapter=None)  # the same base weights without the shipped adapter
    with torch.no_grad():
        tuned, plain = lm.model(**enc).logits[0, -1], base.model(**enc).logits[0, -1]  # (V,)
    assert (tuned - plain).abs().max() > 1.0  # the merged adapter moved the next-token logits


def test_an_adapter_with_a_router_decodes_policy_skiplayer_without_a_checkpoint(tmp_path):
    from hsd_exp import preflight

    assert adapter_router("smollm2_e2e_robust") is None
    assert adapter_router("smollm2_e2e_skiplayer") == WEIGHTS / "smollm2_e2e_skiplayer" / "router"
    plan = preflight.check(compose_config(tmp_path, "+experiment=demo_skiplayer"))  # no ckpt_path: the adapter's
    assert plan.policy.name == "skiplayer"
    with pytest.raises(ConfigError, match="or model.adapter=<an adapter with a router/ folder"):
        preflight.check(compose_config(tmp_path, "+experiment=demo_skiplayer", "model.adapter=smollm2_e2e_robust"))


@pytest.mark.slow
def test_the_shipped_skiplayer_router_loads_beside_its_adapter_and_routes(tmp_path):
    from hsd_exp import tasks

    cfg = compose_config(tmp_path, "+experiment=demo_skiplayer")
    lm = instantiate(cfg.model)
    policy = instantiate(cfg.policy, num_layers=30)
    router = tasks.make_router(cfg, lm, [policy], {})
    assert router is not None and router.num_layers == 30
    prompt = build_prompt("name[Blue Spice], eatType[coffee shop], area[city centre]", cfg.dataset, lm.tokenizer,
                          lm.chat)
    enc = lm.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad(), layer_skipping(lm.model, policy.with_router(router), max_new_tokens=24) as stats:
        out = lm.model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    text = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Blue Spice" in text and 10 < stats.avg_layers < 29  # the trained router skips, and still reads


@pytest.mark.parametrize("overrides", [[], ["task=evaluate"], ["task=evaluate", "policy=full"],
                                       ["task=evaluate", "decode=lossless"]])
def test_the_robust_preset_evaluates_its_headline_full_depth_and_lossless(tmp_path, overrides):
    """policy=full replaces the headline (a preset of its own, not keys the experiment sets on the policy)."""
    from hsd_exp import preflight

    plan = preflight.check(compose_config(tmp_path, "+experiment=smollm2_e2e_robust", *overrides))
    expected = "full" if "policy=full" in overrides else "skipdecode(11,11,keep_first=6)"
    assert plan.policy.label == expected
    assert [p.label for p in plan.compare] == ["full", "hsd(s=1,0,18)", expected]


def test_export_writes_a_half_precision_adapter_and_its_router_that_model_adapter_loads(tmp_path, monkeypatch):
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    import hsd_exp.models.shipped as shipped_module
    from hsd_exp.models.shipped import export_adapter
    from hsd_exp.skip.router import SkipRouter

    base = load_model(**TINY, cache_dir=str(tmp_path))
    peft = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "run" / "hf_model")
    SkipRouter.for_model(base.model).save(tmp_path / "run" / "hf_model" / "router")
    monkeypatch.setattr(shipped_module, "WEIGHTS", tmp_path / "weights")
    out = export_adapter(str(tmp_path / "run" / "hf_model"), "mine", "org/base-model")
    assert out == tmp_path / "weights" / "mine"
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float16}
    assert {t.dtype for t in load_file(out / "router" / "router.safetensors").values()} == {torch.float16}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base-model"
    assert shipped_module.shipped() == ["mine"] and adapter_router("mine") == out / "router"
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        got = load_model(**TINY, cache_dir=str(tmp_path), adapter="mine").model(input_ids=ids).logits
        expected = peft(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-3)  # the float16 copy merges to the trained adapter's outputs


def test_the_presets_data_falls_back_to_the_bundled_sample_where_the_shared_data_is_missing(tmp_path):
    from omegaconf import OmegaConf

    import hsd_exp  # noqa: F401  (registers the resolvers)

    cfg = OmegaConf.create({"here": f"${{hsd_dir_or:{tmp_path},sample}}", "gone": "${hsd_dir_or:/no/such/dir,sample}"})
    assert cfg.here == str(tmp_path) and cfg.gone == "sample"


def test_the_export_cli_takes_flags_or_the_older_positional_words(tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model

    import hsd_exp.models.shipped as shipped_module
    from hsd_exp.models.shipped import main

    assert main(["--help"]) == 0
    assert "usage: python -m hsd_exp.models.shipped SRC --name NAME --base-model HUB_ID" in capsys.readouterr().out
    assert main([str(tmp_path / "none"), "--name", "x", "--base-model", "org/m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.adapter={tmp_path / 'none'} is neither") and err.count("\n") == 1
    assert main([str(tmp_path), "x"]) == 2  # one word after SRC: a usage error
    assert "NAME and HUB_ID" in capsys.readouterr().err

    base = load_model(**TINY, cache_dir=str(tmp_path))
    get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "hf_model")
    monkeypatch.setattr(shipped_module, "WEIGHTS", tmp_path / "weights")
    assert main([str(tmp_path / "hf_model"), "--name", "a", "--base-model", "org/m"]) == 0
    assert main([str(tmp_path / "hf_model"), "b", "org/m"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "weights" / n) for n in ("a", "b")]
    assert shipped_module.shipped() == ["a", "b"]
