"""hsd_exp: Hydra/Lightning experiment framework for layer-skipping decoding (HSD, SkipDecode, CALM).

The stable Python API is this package's top level::

    from hsd_exp import LosslessSettings, SkipRouter, build_policy, layer_skipping

    with layer_skipping(model, build_policy("hsd", s=1, min=0, max=18), max_new_tokens=64) as stats:
        model.generate(**inputs, max_new_tokens=64)

    # lossless: the policy drafts, the full model verifies (greedy output = plain generate()'s)
    with layer_skipping(model, policy, max_new_tokens=64, lossless=LosslessSettings(draft_len=4)) as stats:
        model.generate(**inputs, max_new_tokens=64)

Everything else (``hsd_exp.skip.engine``, ``hsd_exp.eval``, ...) may move between releases.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]  # the checkout (conf/ lives beside the package)

# The public API, imported on first use: `python -m hsd_exp.report` must not pay for torch/transformers.
_PUBLIC = {
    "build_policy": "hsd_exp.skip.policies",
    "Policy": "hsd_exp.skip.policies",
    "layer_skipping": "hsd_exp.skip.engine",
    "LosslessSettings": "hsd_exp.skip.lossless",
    "SkipStats": "hsd_exp.skip.stats",
    "SkipRouter": "hsd_exp.skip.router",
    "ConfigError": "hsd_exp.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hsd_exp' has no attribute {name!r}")


def _policy_label(policy) -> str:
    from hsd_exp.skip.policies import config_label

    node = OmegaConf.to_container(policy, resolve=True) if OmegaConf.is_config(policy) else policy
    return config_label(node) or str(node.get("name", "policy") if isinstance(node, dict) else node)


def _policy_slug(policy) -> str:
    from hsd_exp.run_folder import slug  # no torch: the module that names task=compare's and multirun folders

    return slug(_policy_label(policy))


# `${hsd_root:}` in conf/paths: where the project lives, wherever Hydra runs from.
if not OmegaConf.has_resolver("hsd_root"):
    OmegaConf.register_new_resolver("hsd_root", lambda: str(ROOT))
# `${hsd_dir_or:${paths.data_dir}/e2e,sample}` in presets: real data where this machine has it, else the fallback
# (the bundled sample), so a preset runs on a fresh machine too.
if not OmegaConf.has_resolver("hsd_dir_or"):
    OmegaConf.register_new_resolver("hsd_dir_or", lambda path, fallback: path if os.path.isdir(path) else fallback)
# `${hsd_policy_label:${policy}}` in conf/logger/wandb.yaml: a run's name is its policy's label, hsd(s=1,0,18).
if not OmegaConf.has_resolver("hsd_policy_label"):
    OmegaConf.register_new_resolver("hsd_policy_label", _policy_label)
# `${hsd_policy_slug:${policy}}` in conf/hydra/default.yaml: a multirun job's folder names its policy's label as
# task=compare's folders do, hsd(s=1,0,18) -> hsd_s_1_0_18 (after the job number, so no two jobs share one).
if not OmegaConf.has_resolver("hsd_policy_slug"):
    OmegaConf.register_new_resolver("hsd_policy_slug", _policy_slug)
