"""How policies check and show their parameters: one-line ConfigErrors naming ``policy.<key>`` and the valid range,
and the report's number format. No torch (the report imports the policies)."""

from __future__ import annotations

import math
from typing import Any

from hsd_exp.errors import ConfigError


def fmt(value: Any) -> str:
    """A parameter as the report shows it: 18.0 -> "18", 0.020 -> "0.02", "state" -> "state"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_number(key: str, value: Any, valid: str) -> None:
    """ConfigError unless ``value`` is a finite int or float (a bool is not): e.g. ``policy.max=abc`` from the CLI."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"policy.{key}={value} is not a finite number: must be {valid}")


def check_band(lo: float, hi: float, num_layers: int | None) -> None:
    L = "L" if num_layers is None else f"L={num_layers}"
    check_number("min", lo, f"a number with 0 <= min <= max <= {L} (the model's layers)")
    check_number("max", hi, f"a number with 0 <= min <= max <= {L} (the model's layers)")
    if lo < 0:
        raise ConfigError(f"policy.min={lo:g} is out of range: must be >= 0")
    if lo > hi:
        raise ConfigError(f"policy.min={lo:g} > policy.max={hi:g}: need 0 <= min <= max")
    if num_layers is not None and hi > num_layers:
        raise ConfigError(f"policy.max={hi:g} is out of range: must be <= L={num_layers} (the model's layers, "
                          "model.num_layers; read from config.json when model.path is set)")


def check_keep_first(keep_first: int, num_layers: int | None) -> None:
    if not isinstance(keep_first, int) or isinstance(keep_first, bool) or keep_first < 0:
        raise ConfigError(f"policy.keep_first={keep_first} is out of range: must be an integer >= 0 (0 = the paper)")
    if num_layers is not None and keep_first > num_layers:
        raise ConfigError(f"policy.keep_first={keep_first} is out of range: must be <= L={num_layers}")


def check_threshold(threshold: float, key: str) -> None:
    """The gate's threshold (router.threshold, policy.threshold): a number in (0, 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
        raise ConfigError(f"{key}={threshold} is out of range: must be in (0, 1) (0.5 = the gate's decision "
                          "boundary)")


__all__ = ["check_band", "check_keep_first", "check_number", "check_threshold", "fmt"]
