"""The benchmark's rows and inputs (hsd_exp.bench): a ``bench.policies`` entry as a policy or a ``Lossless`` row, the
router SkipLayer rows use and the adapter whose speed is measured, each checked before the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hsd_exp.errors import ConfigError
from hsd_exp.models.shipped import adapter_router
from hsd_exp.skip.lossless import LosslessSettings
from hsd_exp.skip.policies import Policy, build_policy


@dataclass(frozen=True)
class Lossless:
    """A benchmark row in lossless mode: ``policy`` drafts ``draft_len`` tokens, the full model verifies."""

    policy: Policy
    draft_len: int = LosslessSettings.draft_len
    draft_confidence: float | None = LosslessSettings.draft_confidence  # None: always draft_len tokens
    settings: LosslessSettings = field(init=False, repr=False, compare=False)

    def __post_init__(self):  # LosslessSettings checks both values
        object.__setattr__(self, "settings", LosslessSettings(self.draft_len, self.draft_confidence))

    @property
    def label(self) -> str:
        conf = f",c={self.draft_confidence:g}" if self.draft_confidence is not None else ""
        return f"{self.policy.label} lossless(k={self.draft_len}{conf})"

    @property
    def objects(self) -> tuple[str, ...]:
        return self.policy.objects


def bench_policy(entry: dict, depth: int | None) -> Policy | Lossless:
    """One ``bench.policies`` entry: a policy's parameters, plus ``lossless: true`` (and ``draft_len``) for a
    lossless row that drafts with it."""
    lossless = entry.pop("lossless", False)
    settings = {k: entry.pop(k) for k in ("draft_len", "draft_confidence") if k in entry}
    policy = build_policy(num_layers=depth, **entry)
    return Lossless(policy, **settings) if lossless else policy


def with_router(row: Policy | Lossless, router) -> Policy | Lossless:
    if "router" not in row.objects:
        return row
    if isinstance(row, Lossless):
        return Lossless(row.policy.with_router(router), row.draft_len, row.draft_confidence)
    return row.with_router(router)


def check_router_source(router: str | None, adapter: str | None, policies) -> Path | None:
    """The router directory SkipLayer rows use: ``bench.router``, else ``<bench.adapter>/router``. Checked before
    the model loads; a SkipLayer row without one is refused."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"bench.adapter={adapter} holds no LoRA adapter (adapter_config.json): pass a LoRA "
                          "run's <run>/hf_model")
    if router is None:  # the router saved beside the adapter (the one lookup tasks use for model.adapter)
        router = adapter_router(adapter)
    if not any("router" in p.objects for p in policies):
        return None
    if router is None:
        raise ConfigError("bench.policies has a skiplayer row but no router: set bench.router=<run>/hf_model/router "
                          "(or bench.adapter=<run>/hf_model, whose router/ it then uses)")
    if not (Path(router) / "router.json").is_file():
        raise ConfigError(f"bench.router={router} holds no router (router.json + router.safetensors): pass "
                          "<run>/hf_model/router of a run trained with finetune.router=true")
    return Path(router)


def bench_adapter(bench_value: str | None, model_value: str | None) -> str | None:
    """The adapter whose speed is measured: ``bench.adapter`` (a run's hf_model) or ``model.adapter`` (also a
    shipped name), not both."""
    if bench_value and model_value:
        raise ConfigError(f"bench.adapter={bench_value} and model.adapter={model_value} both name an adapter: "
                          "keep one (model.adapter also takes a shipped name)")
    return bench_value or model_value or None


def overrides_key(hydra_cfg, key: str) -> bool:
    """Whether the command line set ``key`` (``key=...``, ``+key=...``, ``++key=...``)."""
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in hydra_cfg.overrides.task)


__all__ = ["Lossless", "bench_adapter", "bench_policy", "check_router_source", "overrides_key", "with_router"]
