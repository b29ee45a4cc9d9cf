"""hsd_exp: Hydra/Lightning experiment framework for layer-skipping decoding (HSD, SkipDecode, CALM)."""

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]  # the checkout (conf/ lives beside the package)

# `${hsd_root:}` in conf/paths: where the project lives, wherever Hydra runs from.
if not OmegaConf.has_resolver("hsd_root"):
    OmegaConf.register_new_resolver("hsd_root", lambda: str(ROOT))


def _policy_label(policy) -> str:
    from hsd_exp.policies import config_label

    node = OmegaConf.to_container(policy, resolve=True) if OmegaConf.is_config(policy) else policy
    return config_label(node) or str(node.get("name", "policy") if isinstance(node, dict) else node)


# `${hsd_policy_label:${policy}}` in conf/logger/wandb.yaml: a run's name is its policy's label, hsd(s=1,0,18).
if not OmegaConf.has_resolver("hsd_policy_label"):
    OmegaConf.register_new_resolver("hsd_policy_label", _policy_label)
