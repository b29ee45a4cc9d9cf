"""What a run prints: progress, results and real warnings, the libraries' boilerplate only with -v / hydra.verbose;
the progress tick inside generate() changes no token."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

from hsd_exp import console

from helpers import CACHE_DIR, load

ROOT = Path(__file__).resolve().parents[1]

# The lines every run repeated (issue 15: 68 of a grid log's 102 lines)
BOILERPLATE = ("GPU available", "TPU available", "Tip:", "val_check_interval", "LeafSpec", "Using default tokenizer",
               "Loading weights", "will be deleted", "length zero", "anonymous setting")


# ---------------------------------------------------------------------------------------------- StepTick
@pytest.mark.parametrize("decode", [
    {"do_sample": False},
    {"do_sample": False, "num_beams": 4},
    {"do_sample": True, "temperature": 0.7, "top_p": 0.9},
], ids=["greedy", "beam4", "sample"])
def test_step_tick_counts_tokens_and_changes_none(decode):
    lm = load("tiny-gpt2")
    enc = lm.tokenizer(["The quick brown fox", "Hello"], return_tensors="pt", padding=True)
    gen = GenerationConfig(max_new_tokens=7, min_new_tokens=7, pad_token_id=lm.tokenizer.pad_token_id,
                           eos_token_id=lm.tokenizer.eos_token_id, **decode)
    ticks = []

    def run(processors):
        torch.manual_seed(0)
        with torch.no_grad():
            return lm.model.generate(**enc, generation_config=gen, logits_processor=processors)

    plain = run(None)
    ticked = run(LogitsProcessorList([console.StepTick(lambda: ticks.append(1))]))
    assert torch.equal(plain, ticked)
    assert len(ticks) == 7  # one per generated token, whatever the batch and beams


def test_progress_bar_off_a_terminal_only_counts():
    with console.progress_bar(3, "Generating") as advance:  # pytest's stderr is no terminal
        for _ in range(5):
            advance()


# ---------------------------------------------------------------------------------------------- quiet_libraries
def test_quiet_libraries_silences_boilerplate_and_keeps_warnings(restore_console, tmp_path, capfd):
    lm = load("tiny-llama")
    lm.model.save_pretrained(tmp_path, safe_serialization=True)
    console.quiet_libraries(verbose=False)

    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert not rank_zero.isEnabledFor(logging.INFO) and rank_zero.isEnabledFor(logging.WARNING)
    assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("Experiment logs directory /x exists and is not empty. Previous log files in this directory "
                      "will be deleted when the new ones are saved!", UserWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a real problem"]
    assert os.environ["WANDB_SILENT"] == "true"

    from transformers import AutoModelForCausalLM

    capfd.readouterr()
    AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "Loading weights" not in capfd.readouterr().err


def test_verbose_keeps_everything(restore_console):
    logging.getLogger("pytorch_lightning").setLevel(logging.INFO)
    for verbose in (True, "hsd_exp", ["pytorch_lightning"]):
        console.quiet_libraries(verbose=verbose)
        assert logging.getLogger("pytorch_lightning.utilities.rank_zero").isEnabledFor(logging.INFO)
    assert "WANDB_SILENT" not in os.environ


# ---------------------------------------------------------------------------------------------- a real grid
GRID = ["-m", "task=evaluate", "model=tiny-gpt2", "dataset.path=sample", "dataset.limit=4", "decode.max_new_tokens=6",
        "bertscore.enabled=false", "policy=full,hsd_s1_max12", "model.tiny.layers=24", "model.num_layers=24"]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HSD_CACHE_DIR": CACHE_DIR, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hsd_exp", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)


def test_a_grid_prints_progress_and_results_only(tmp_path):
    """The README's grid: two jobs, each its bar and its result line; resumed, still nothing else; -v brings the
    libraries' lines back."""
    sweep = f"hydra.sweep.dir={tmp_path / 'grid'}"
    for attempt in ("first", "resumed"):  # resumed: CSVLogger's and the empty DataLoader's warnings
        out = _cli([*GRID, sweep])
        assert out.returncode == 0, out.stderr[-3000:]
        text = out.stdout + out.stderr
        assert not [b for b in BOILERPLATE if b in text], f"{attempt}:\n{text}"
        results = [ln for ln in text.splitlines() if "Avg. Layer" in ln]
        assert len(results) == 2, text
        assert len(text.strip().splitlines()) <= 8, f"{attempt}:\n{text}"  # 2 HYDRA lines + 3 per job at most
    one = [a if not a.startswith("policy=") else "policy=full" for a in GRID]
    verbose = _cli([*one, "-v", f"hydra.sweep.dir={tmp_path / 'verbose'}"])
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "GPU available" in verbose.stdout + verbose.stderr


def test_wandb_without_a_key_logs_offline_in_one_line(tmp_path):
    """logger=wandb with no API key (and no WANDB_MODE) crashed in wandb.init asking for the key; now it runs
    offline, W&B's banner is silenced and one line says where the run is and how to upload it."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), HF_HUB_OFFLINE="1",
               HSD_CACHE_DIR=CACHE_DIR, OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "hsd_exp", "task=evaluate", "model=tiny-gpt2", "dataset.path=sample",
                          "dataset.limit=2", "decode.max_new_tokens=4", "bertscore.enabled=false", "logger=wandb",
                          f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert [ln for ln in text.splitlines() if "wandb sync" in ln and str(run_dir) in ln], text
    assert not [b for b in BOILERPLATE if b in text] and "wandb:" not in text, text
    assert list((run_dir / "wandb").glob("offline-run-*"))
