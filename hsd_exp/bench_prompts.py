"""The benchmark's prompts, in the format the timed weights were trained with (hsd_exp.bench).

A fine-tuned adapter answers only its own prompt format: the E2E adapters were trained with ``model.chat=false``
(``source + separator``, the dataset's separator), so timing them on chat-template prompts measures acceptance
and output lengths of inputs they never saw. The format therefore comes from the adapter:

- a run's ``<run>/hf_model``: the run's own config, ``<run>/.hydra/config.yaml`` (``model.chat``, ``dataset``);
- a shipped adapter (``hsd_exp/weights/<name>``): the preset that loads it, the ``conf/experiment/*.yaml`` whose
  ``model.adapter`` names it, composed as ``+experiment=<preset>`` would compose it;
- no adapter: the model's own ``model.chat`` and the E2E dataset.

An explicit ``model.chat=...`` that disagrees with the adapter's is refused (one line), never replaced. Prompts are
built by evaluation's code (``hsd_exp.data.prompts``) from the bundled sample of the format's dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

import hsd_exp
from hsd_exp.errors import ConfigError
from hsd_exp.models.shipped import WEIGHTS, resolve_adapter

CONF = Path(hsd_exp.ROOT) / "conf"


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are built: chat template or ``source + separator``, with this dataset node's instruction,
    separator and source budget; ``origin`` says where the format was read (for the run log and bench.csv)."""

    chat: bool
    dataset: dict = field(compare=False)
    origin: str

    @property
    def dataset_name(self) -> str:
        return str(self.dataset.get("name"))


def _sample_node(dataset) -> dict:
    """A dataset node pointed at its bundled sample (the bench's inputs), its evaluation subset lifted."""
    node = OmegaConf.to_container(dataset, resolve=False) if OmegaConf.is_config(dataset) else dict(dataset)
    return {**node, "path": "sample", "limit": None, "split": "test"}


def _default_dataset() -> dict:
    return _sample_node(OmegaConf.load(CONF / "dataset" / "e2e.yaml"))


def shipped_preset(name: str) -> Path | None:
    """The ``conf/experiment/*.yaml`` whose ``model.adapter`` is the shipped adapter ``name`` (first by name)."""
    for preset in sorted((CONF / "experiment").glob("*.yaml")):
        node = OmegaConf.load(preset)
        if OmegaConf.select(node, "model.adapter", default=None) == name:
            return preset
    return None


def _compose_preset(preset: Path):
    """``config`` composed with ``+experiment=<preset>``: inside the Hydra app (same config tree) or on its own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"+experiment={preset.stem}"]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def trained_format(adapter: str) -> PromptFormat:
    """The prompt format the adapter ``adapter`` (a shipped name or a LoRA folder) was trained with."""
    folder = resolve_adapter(adapter).resolve()
    if folder.parent == WEIGHTS.resolve():
        preset = shipped_preset(folder.name)
        if preset is None:
            raise ConfigError(f"adapter {folder.name} is shipped but no conf/experiment preset sets model.adapter="
                              f"{folder.name}: add its preset (model.chat, dataset) so the bench can build its prompts")
        cfg = _compose_preset(preset)
        return PromptFormat(bool(cfg.model.chat), _sample_node(cfg.dataset),
                            f"conf/experiment/{preset.name}")
    run_config = folder.parent / ".hydra" / "config.yaml"
    if not run_config.is_file():
        raise ConfigError(f"adapter {adapter} has no run config ({run_config}) saying how its prompts were built: "
                          "pass the <run>/hf_model of a run folder, or a shipped adapter name")
    cfg = OmegaConf.load(run_config)
    chat, dataset = OmegaConf.select(cfg, "model.chat"), OmegaConf.select(cfg, "dataset")
    if chat is None or dataset is None:
        raise ConfigError(f"{run_config} records no model.chat / dataset: the bench cannot tell how {adapter} "
                          "was prompted in training; pass a run folder written by python -m hsd_exp")
    return PromptFormat(bool(chat), _sample_node(dataset), str(run_config))


def prompt_format(model_chat: bool, adapter: str | None, chat_overridden: bool) -> PromptFormat:
    """The bench's prompt format: the adapter's own (``trained_format``), else the model's ``model.chat`` on E2E.

    ``chat_overridden``: the user set ``model.chat`` on the command line; if it disagrees with the adapter's
    training format the run is refused (prompts in another format measure another model)."""
    if not adapter:
        return PromptFormat(bool(model_chat), _default_dataset(), "model.chat")
    trained = trained_format(adapter)
    if chat_overridden and bool(model_chat) != trained.chat:
        raise ConfigError(f"model.chat={str(bool(model_chat)).lower()} but adapter {adapter} was trained with "
                          f"model.chat={str(trained.chat).lower()} ({trained.origin}): drop the model.chat override "
                          "so the bench prompts it as it was trained")
    return trained


def prompts_for(fmt: PromptFormat, tokenizer, batch_size: int) -> list[str]:
    """``batch_size`` prompts from the format's bundled sample (test split), built as evaluation builds them."""
    from hsd_exp.data.loaders import load_examples
    from hsd_exp.data.prompts import build_prompt

    examples = load_examples(fmt.dataset, split="test", limit=max(batch_size, 1))
    if len(examples) < batch_size:
        raise ConfigError(f"bench.batch_sizes asks for {batch_size} prompts but the {fmt.dataset_name} sample "
                          f"holds {len(examples)}: use a batch size <= {len(examples)}")
    return [build_prompt(ex.source, fmt.dataset, tokenizer, fmt.chat) for ex in examples[:batch_size]]


__all__ = ["PromptFormat", "prompt_format", "prompts_for", "shipped_preset", "trained_format"]
