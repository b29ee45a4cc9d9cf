"""hsd_exp: Hydra/Lightning experiment framework for layer-skipping decoding (HSD, SkipDecode, CALM)."""

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]  # the checkout (conf/ lives beside the package)

# `${hsd_root:}` in conf/paths: where the project lives, wherever Hydra runs from.
if not OmegaConf.has_resolver("hsd_root"):
    OmegaConf.register_new_resolver("hsd_root", lambda: str(ROOT))
