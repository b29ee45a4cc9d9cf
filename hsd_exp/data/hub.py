"""The Hugging Face Hub: one fast reachability probe (models, datasets and BERTScore share it) and Hub datasets
loaded cache-only when it does not answer, so an offline run fails in milliseconds with the fix named."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

from hsd_exp.errors import ConfigError

HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    """False when offline mode is set or huggingface.co:443 does not answer within 3 s."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may be the only way out: let the client try
    host = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """Make `datasets` / `huggingface_hub` cache-only for one call (their flags are read at import)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_hub(cfg: dict, split: str, wanted: str | None = None) -> Any:
    """Hub split ``split``; ``wanted``: the split derived from it (HealthCareMagic), for the error message."""
    hub_id, hub_config = cfg.get("hub_id"), cfg.get("hub_config")
    name = cfg.get("name")
    if not hub_id:
        raise ConfigError(
            f"dataset {name!r} has neither dataset.path nor dataset.hub_id; set dataset.path=DIR"
        )
    import datasets

    offline = not hub_reachable()
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(hub_id, hub_config, split=split)
    except ValueError as e:
        if "split" in str(e).lower() and "unknown" in str(e).lower():
            raise ConfigError(
                f"split {split!r} not found in Hub dataset {hub_id!r}: {e}; set dataset.split=<one of them>"
            ) from e
        raise ConfigError(_hub_error(cfg, split, offline, e, wanted)) from e
    except Exception as e:  # connection errors, missing repo, missing cache entry
        raise ConfigError(_hub_error(cfg, split, offline, e, wanted)) from e


def _hub_error(cfg: dict, split: str, offline: bool, err: Exception, wanted: str | None = None) -> str:
    hub = cfg.get("hub_id") + (f" ({cfg.get('hub_config')})" if cfg.get("hub_config") else "")
    why = "the Hub is unreachable (offline) and it is not in the local cache" if offline else f"{err}"
    which = f"split {wanted!r} (derived from the Hub's {split!r} split)" if wanted and wanted != split else \
        f"split {split!r}"
    return (
        f"cannot load dataset {cfg.get('name')!r} {which}: tried dataset.path (null) and Hub id "
        f"{hub}: {why}. Set dataset.path=DIR to a folder with {wanted or split}.jsonl (Hub schema) or the "
        f"original release files, or run once online to cache it"
    )
