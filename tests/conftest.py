"""Shared fixtures: models load once per session (tiny ones in ~0.2 s, smollm2-135m in ~2 s and gemma3-270m in
~5 s once converted); synthetic run folders for the runs and report tests. Helpers the tests import live in
``tests/helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from helpers import load, make_multirun  # noqa: E402  (after the offline switches)


@pytest.fixture(params=["tiny-gpt2", "tiny-phi", "tiny-llama"])
def tiny(request):
    return load(request.param)


@pytest.fixture
def smollm2():
    return load("smollm2-135m")


@pytest.fixture
def gemma3():
    """The real Gemma-3-270M; skipped where its GGUF packages are not installed (nor a converted copy cached)."""
    from helpers import gemma3_missing

    if reason := gemma3_missing():
        pytest.skip(f"gemma3-270m unavailable: {reason}")
    return load("gemma3-270m")


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    return make_multirun(tmp_path / "multirun")


@pytest.fixture
def one_thread():
    """Tiny models on one thread (more only contend with other jobs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_console(monkeypatch):
    """quiet_libraries changes process-wide state: put it back after the test."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from hsd_exp import console

    levels = {name: logging.getLogger(name).level for name in console.LIBRARY_LOGGERS}
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    hook = hf_logging.set_tqdm_hook(None)
    hf_logging.set_tqdm_hook(hook)
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    hf_logging.set_tqdm_hook(hook)
