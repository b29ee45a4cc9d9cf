"""Skip policies: which decoder layers run for each generated token.

Notation (papers): layers are 1-indexed ``i in [1, L]``; ``T`` is the index of the generated token being
processed (0 = the first new token) and ``Tmax`` = max_new_tokens. The prompt (prefill) always runs every
layer. Code returns 0-based indices (``i - 1``), sorted.

The static policies (full, SkipDecode, HSD) are *monotone*: the set run at T+1 is a subset of the set run
at T. So any layer that runs for a token already holds K/V for every earlier position, and the KV cache
stays exact without recomputation. ``tests/test_policies.py`` asserts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from hsd_exp.errors import ConfigError


def band_size(step: int, max_steps: int, min_layers: float, max_layers: float) -> float:
    """SkipDecode's linear decay: n(T) = (T*min + (Tmax - T)*max) / Tmax, with T clamped to [0, Tmax]."""
    t = min(max(step, 0), max_steps)
    return (t * min_layers + (max_steps - t) * max_layers) / max_steps


def top_band(step: int, max_steps: int, num_layers: int, min_layers: float, max_layers: float) -> set[int]:
    """{ i : i >= L - n(T) } (1-indexed), returned 0-based.

    The band starts at ceil(L - n(T)) = L - floor(n(T)), so it holds floor(n(T)) + 1 layers while n(T) < L
    (all L at n(T) = L), one more than n(T) for integer n: SkipDecode(10,20) on L=30 runs layers 10..30
    (21) at T=0 and 20..30 (11) at T=Tmax; min = 0 still runs layer L.
    """
    first = max(1, math.ceil(num_layers - band_size(step, max_steps, min_layers, max_layers)))
    return set(range(first - 1, num_layers))


def bottom_layers(keep_first: int) -> set[int]:
    """{ i : i <= k } (1-indexed), returned 0-based: the ``keep_first`` ablation's always-run bottom layers."""
    return set(range(keep_first))


def _extra_label(keep_first: int) -> str:
    return f",keep_first={keep_first}" if keep_first else ""


@dataclass(frozen=True)
class Policy:
    """Base class. ``static`` policies decide from (T, Tmax, L) alone; dynamic ones (CALM) per token."""

    name = "policy"
    static = True

    @property
    def label(self) -> str:  # the row name in tables and plots
        return self.name

    def params(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def check_num_layers(self, num_layers: int) -> None:
        """Raise ConfigError if the policy cannot apply to a model of ``num_layers`` layers."""

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        raise NotImplementedError


@dataclass(frozen=True)
class Full(Policy):
    """Every layer, every token: plain decoding through the engine (the quality/speed baseline)."""

    name = "full"

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers))


@dataclass(frozen=True)
class SkipDecode(Policy):
    """SkipDecode (Del Corro et al. 2023): run the top band of layers, skip the bottom ones.

        n(T) = (T*min + (Tmax - T)*max) / Tmax
        run  { i : i >= L - n(T) }  [ U { i : i <= k }  with keep_first = k > 0, an ablation ]

    With fractional n(T) the band starts at ceil(L - n(T)), so it holds floor(n(T)) + 1 layers while
    n(T) < L (all L at n(T) = L): SkipDecode(10,20) on L=30 runs 21 layers at T=0 falling to 11 at T=Tmax.
    """

    min: float = 10
    max: float = 20
    keep_first: int = 0
    name = "skipdecode"

    @property
    def label(self) -> str:
        return f"skipdecode({self.min:g},{self.max:g}{_extra_label(self.keep_first)})"

    def check_num_layers(self, num_layers: int) -> None:
        _check_band(self.min, self.max, num_layers)
        _check_keep_first(self.keep_first, num_layers)

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        return _cached_skipdecode(step, max_steps, num_layers, self.min, self.max, self.keep_first)


@dataclass(frozen=True)
class HSD(Policy):
    """Hierarchical Skip Decoding (arXiv 2403.14919, eqs. 4-5): evenly spaced layers plus a shrinking top band.

        n(T) = (T*min + (Tmax - T)*max) / Tmax
        run  { i : i mod (s+1) = 0 }  U  { i : i >= L - n(T) }

    The band, as in SkipDecode, starts at ceil(L - n(T)) and so holds floor(n(T)) + 1 layers while n(T) < L
    (hsd(s=1,0,18) on L=30: band 12..30 at T=0, just {30} at T=Tmax).
    With s >= 1 layer 1 is skipped for every generated token (the engine keeps positions and masks right).
    ``keep_first = k > 0`` (an ablation, not in the paper) also runs the bottom layers { i : i <= k } for
    every token, to measure what skipping them costs; the paper's HSD is k = 0.
    """

    s: int = 1
    min: float = 0
    max: float = 18
    keep_first: int = 0
    name = "hsd"

    @property
    def label(self) -> str:
        return f"hsd(s={self.s},{self.min:g},{self.max:g}{_extra_label(self.keep_first)})"

    def check_num_layers(self, num_layers: int) -> None:
        _check_band(self.min, self.max, num_layers)
        _check_keep_first(self.keep_first, num_layers)

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        return _cached_hsd(step, max_steps, num_layers, self.s, self.min, self.max, self.keep_first)


@dataclass(frozen=True)
class CALM(Policy):
    """CALM early exit (Schuster et al. 2022), as the HSD paper ran it.

    After each layer i >= ``first_exit`` (1-indexed) of a generated token, a confidence c_i is computed and
    the token exits when c_i >= lambda_i, with the depth-decreasing threshold

        lambda_i = clip(1 - d * i, 0, 1)
        optional position decay (CALM eq. 6):  lambda_i(t) = clip(0.9 * lambda_i + 0.1 * exp(-tau * t / Tmax), 0, 1)

    Criteria: ``softmax``: c_i = p_top1 - p_top2 of softmax(lm_head(final_norm(h_i)));
              ``state``:   c_i = cos(h_i, h_{i-1}) (hidden-state saturation).
    Batch / beams: one exit per step for the whole batch, taken when the *least* confident row is
    confident (c_i >= lambda_i for every row) - t5x's CALM rule; so no row exits earlier than it would alone.
    Layers above the exit receive the exited hidden state and write their K/V from it (state propagation),
    so later tokens always find a complete cache.
    """

    d: float = 0.02
    criterion: str = "softmax"
    first_exit: int = 1
    decay: bool = False
    tau: float = 4.0
    name = "calm"
    static = False

    @property
    def label(self) -> str:
        extra = "" if self.first_exit == 1 else f",first_exit={self.first_exit}"
        extra += f",decay(tau={self.tau:g})" if self.decay else ""
        return f"calm(d={self.d:g},{self.criterion}{extra})"

    def check_num_layers(self, num_layers: int) -> None:
        if not 1 <= self.first_exit <= num_layers:
            raise ConfigError(f"policy.first_exit={self.first_exit} is out of range: must be in [1, {num_layers}]")

    def threshold(self, layer: int, step: int, max_steps: int) -> float:
        """lambda for 1-indexed ``layer`` at generated-token index ``step``."""
        lam = min(max(1.0 - self.d * layer, 0.0), 1.0)
        if self.decay:
            lam = 0.9 * lam + 0.1 * math.exp(-self.tau * step / max(max_steps, 1))
        return min(max(lam, 0.0), 1.0)


def _check_number(key: str, value: Any, valid: str) -> None:
    """ConfigError unless ``value`` is a finite int or float (a bool is not): e.g. ``policy.max=abc`` from the CLI."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"policy.{key}={value} is not a finite number: must be {valid}")


def _check_band(lo: float, hi: float, num_layers: int | None) -> None:
    L = "L" if num_layers is None else f"L={num_layers}"
    _check_number("min", lo, f"a number with 0 <= min <= max <= {L} (the model's layers)")
    _check_number("max", hi, f"a number with 0 <= min <= max <= {L} (the model's layers)")
    if lo < 0:
        raise ConfigError(f"policy.min={lo:g} is out of range: must be >= 0")
    if lo > hi:
        raise ConfigError(f"policy.min={lo:g} > policy.max={hi:g}: need 0 <= min <= max")
    if num_layers is not None and hi > num_layers:
        raise ConfigError(f"policy.max={hi:g} is out of range: must be <= L={num_layers} (the model's layers, "
                          "model.num_layers: set it too when model.path holds a model of another depth)")


def _check_keep_first(keep_first: int, num_layers: int | None) -> None:
    if not isinstance(keep_first, int) or isinstance(keep_first, bool) or keep_first < 0:
        raise ConfigError(f"policy.keep_first={keep_first} is out of range: must be an integer >= 0 (0 = the paper)")
    if num_layers is not None and keep_first > num_layers:
        raise ConfigError(f"policy.keep_first={keep_first} is out of range: must be <= L={num_layers}")


@lru_cache(maxsize=65536)  # the engine asks once per token; this keeps the Python cost off the hot path
def _cached_skipdecode(step, max_steps, num_layers, lo, hi, keep_first) -> tuple[int, ...]:
    return tuple(sorted(top_band(step, max_steps, num_layers, lo, hi) | bottom_layers(keep_first)))


@lru_cache(maxsize=65536)
def _cached_hsd(step, max_steps, num_layers, s, lo, hi, keep_first) -> tuple[int, ...]:
    spaced = {i - 1 for i in range(1, num_layers + 1) if i % (s + 1) == 0}
    return tuple(sorted(spaced | top_band(step, max_steps, num_layers, lo, hi) | bottom_layers(keep_first)))


POLICIES = {"full": Full, "skipdecode": SkipDecode, "hsd": HSD, "calm": CALM}
CRITERIA = ("softmax", "state")


def config_label(policy: Any) -> str | None:
    """The label of a policy config node (``{name, ...params}``, e.g. ``hsd(s=1,0,18)``); None if the node
    names no policy or its parameters are invalid (or unresolved)."""
    if not isinstance(policy, dict) or "name" not in policy:
        return None
    params = {k: v for k, v in policy.items() if k not in ("_target_", "name")}
    try:
        return build_policy(policy["name"], **params).label
    except Exception:  # e.g. an unresolved interpolation as a parameter
        return None


def build_policy(name: str, num_layers: int | None = None, **params) -> Policy:
    """Validate and build a policy: ``build_policy("hsd", s=1, min=0, max=18)``.

    ``num_layers`` (L, when known before loading the model) also checks ``max <= L``. All checks run
    before any model is loaded and raise ConfigError naming the parameter, its value and the valid range.
    """
    if name not in POLICIES:
        raise ConfigError(f"policy.name={name} is unknown; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    unknown = set(params) - set(cls.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"policy '{name}' has no parameter(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(cls.__dataclass_fields__) or 'none'}"
        )
    if name == "hsd":
        s = params.get("s", HSD.s)
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"policy.s={s} is out of range: must be an integer >= 0")
    if name in ("hsd", "skipdecode"):
        default = cls()
        _check_band(params.get("min", default.min), params.get("max", default.max), num_layers)
        _check_keep_first(params.get("keep_first", 0), num_layers)
    if name == "calm":
        d = params.get("d", CALM.d)
        _check_number("d", d, "a number > 0 (the paper uses 0.02 and 0.005)")
        if not d > 0:
            raise ConfigError(f"policy.d={d} is out of range: must be > 0 (the paper uses 0.02 and 0.005)")
        crit = params.get("criterion", CALM.criterion)
        if crit not in CRITERIA:
            raise ConfigError(f"policy.criterion={crit} is unknown; choose one of {', '.join(CRITERIA)}")
        first_exit = params.get("first_exit", CALM.first_exit)
        if not isinstance(first_exit, int) or isinstance(first_exit, bool) or first_exit < 1:
            raise ConfigError(f"policy.first_exit={first_exit} is out of range: must be an integer >= 1 "
                              "(the 1-indexed first layer that may exit, <= L)")
        tau = params.get("tau", CALM.tau)
        _check_number("tau", tau, "a number >= 0 (the position decay's rate; CALM uses 4)")
        if tau < 0:
            raise ConfigError(f"policy.tau={tau:g} is out of range: must be >= 0 (the position decay's rate; CALM uses 4)")
        decay = params.get("decay", CALM.decay)
        if not isinstance(decay, bool):  # a string "no" would otherwise switch the decay on
            raise ConfigError(f"policy.decay={decay!r} must be true or false (CALM's position decay)")
    policy = cls(**params)
    if num_layers is not None:
        policy.check_num_layers(num_layers)
    return policy
