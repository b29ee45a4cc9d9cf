"""Weights shipped inside the package: LoRA adapters this project trained, in ``hsd_exp/weights/<name>/``.

Each folder is a peft adapter (``adapter_config.json``, half-precision ``adapter_model.safetensors``) with a card
(``README.md``: the command that trained it, data, budget, licences). ``model.adapter`` names one of them, or any
directory holding a peft LoRA adapter (a run's ``<run>/hf_model``); it is merged into the base weights on load,
so a skipping policy costs what it costs on the base model.
"""

from __future__ import annotations

from pathlib import Path

from hsd_exp.errors import ConfigError

WEIGHTS = Path(__file__).resolve().parent / "weights"


def shipped() -> list[str]:
    """Names of the adapters shipped in the package."""
    return sorted(p.name for p in WEIGHTS.iterdir() if (p / "adapter_config.json").is_file()) if WEIGHTS.is_dir() \
        else []


def resolve_adapter(value: str) -> Path:
    """``model.adapter`` as a directory: a shipped name or a path. ConfigError naming the value otherwise."""
    named = WEIGHTS / str(value)
    if "/" not in str(value) and (named / "adapter_config.json").is_file():
        return named
    path = Path(str(value)).expanduser()
    if (path / "adapter_config.json").is_file():
        return path
    raise ConfigError(f"model.adapter={value} is neither a shipped adapter ({', '.join(shipped()) or 'none'}) nor "
                      "a directory with a peft adapter_config.json: pass a LoRA run's <run>/hf_model")


def merge_adapter(model, value: str):
    """``model`` with the LoRA adapter ``value`` merged into its weights (its dtype kept)."""
    from peft import PeftModel

    dtype = model.dtype
    merged = PeftModel.from_pretrained(model, str(resolve_adapter(value)))  # fp16 adapter: upcast by peft
    return merged.merge_and_unload().to(dtype)
