"""Skip policies: which decoder layers run for each generated token.

Notation (papers): layers are 1-indexed ``i in [1, L]``; ``T`` is the index of the generated token being
processed (0 = the first new token) and ``Tmax`` = max_new_tokens. The prompt (prefill) always runs every
layer. Code returns 0-based indices (``i - 1``), sorted.

The static policies (full, SkipDecode, HSD) are *monotone*: the set run at T+1 is a subset of the set run
at T. So any layer that runs for a token already holds K/V for every earlier position, and the KV cache
stays exact without recomputation. ``tests/skip/test_policies.py`` asserts it.

A policy class describes itself to the rest of the code: ``name`` (its key in ``POLICIES`` and
``conf/policy/*.yaml``), ``label`` (run names, folder slugs), ``display_name`` and ``plot_line`` (the report's
row and plot line), ``order``, ``style``, ``baseline``. Defining a subclass with a ``name`` registers it.
This module imports no torch: the report rebuilds policies from run folders to name their rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, ClassVar

from hsd_exp.errors import ConfigError
from hsd_exp.skip.modes import KINDS, STATIC
from hsd_exp.skip.params import check_band, check_keep_first, fmt

POLICIES: dict[str, type[Policy]] = {}  # name -> class, filled by Policy.__init_subclass__


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


@dataclass(frozen=True)
class Policy:
    """Base class: a frozen dataclass whose fields are the policy's parameters (``params()``).

    ``kind`` says which protocol of hsd_exp.skip.modes the engine asks: "static" policies decide from (T, Tmax, L)
    alone (``layers``), "per_step" ones inside each decode step (``begin_step``), "per_token" ones per row and
    position (``begin_forward``). A subclass that sets ``name`` is registered in POLICIES, so
    ``build_policy(name, ...)`` and ``conf/policy/<file>.yaml`` reach it.
    """

    name: ClassVar[str] = "policy"  # registry key: conf/policy/*.yaml's `name:`
    title: ClassVar[str] = ""  # the paper's method name in the report ("HSD"); default: name
    kind: ClassVar[str] = STATIC  # hsd_exp.skip.modes: STATIC, PER_STEP or PER_TOKEN
    static: ClassVar[bool] = True  # kind == STATIC, derived per class: "decided ahead of decoding?"
    baseline: ClassVar[bool] = False  # the report's reference row (Speedup, % of full)
    order: ClassVar[int] = 100  # where the report puts this family among the others (rows, plot lines)
    style: ClassVar[tuple[str | None, str]] = (None, "o")  # plot (colour, marker); None = matplotlib's next
    objects: ClassVar[tuple[str, ...]] = ()  # constructor arguments that are objects, not parameters (a router)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "static" in cls.__dict__ or "per_token" in cls.__dict__:  # the flags kind replaced: say so, not ignore
            raise TypeError(f"{cls.__qualname__} sets static/per_token: set kind = 'per_step' or 'per_token' "
                            "instead (hsd_exp.skip.modes)")
        if cls.kind not in KINDS:
            raise TypeError(f"{cls.__qualname__}.kind={cls.kind!r}: choose one of {', '.join(KINDS)}")
        cls.static = cls.kind == STATIC
        if "name" not in cls.__dict__:  # a helper subclass (tests' Replay) names no policy: not registered
            return
        cls.title = cls.__dict__.get("title") or cls.name
        taken = POLICIES.get(cls.name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"policy name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                             f"give {cls.__qualname__} another name")
        POLICIES[cls.name] = cls

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def params(self) -> dict:
        return {k: getattr(self, k) for k in self.param_names()}

    def options(self) -> list[str]:
        """Options beyond the paper's setting, as "key=value" (e.g. ["keep_first=2"]): a variant gets its
        own label, row and plot line."""
        return []

    @property
    def variant(self) -> bool:  # the plot draws a variant dashed, in a colour of its own
        return bool(self.options())

    @property
    def label(self) -> str:
        """Run name and folder slug: "name" or "name(k=v,...)"."""
        inner = ",".join(f"{k}={fmt(v)}" for k, v in self.params().items())
        return f"{self.name}({inner})" if inner else self.name

    @property
    def display_name(self) -> str:
        """The report's row name: "Title" or "Title (k=v, ...)"."""
        inner = ", ".join(f"{k}={fmt(v)}" for k, v in self.params().items())
        return f"{self.title} ({inner})" if inner else self.title

    @property
    def plot_line(self) -> str:
        """The report's plot line (and sort group); a variant's options follow the line's name."""
        return _with_options(self.title, self.options())

    def validate(self, num_layers: int | None = None) -> None:
        """Raise ConfigError naming the bad parameter; with ``num_layers`` (L) also check the policy fits."""

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        """Static: the sorted 0-based layers run for generated token ``step`` (T) of ``max_steps`` (Tmax)."""
        raise NotImplementedError(f"{type(self).__name__} is static: define layers(step, max_steps, num_layers)")

    def begin_step(self, step: int, max_steps: int, num_layers: int, readout):
        """Per-step: an object deciding decode step T layer by layer (``runs``, ``after_layer``, ``record``, ``evals``)."""
        raise NotImplementedError(f"{type(self).__name__} is kind={self.kind!r}: define begin_step(...)")


def _with_options(text: str, options: list[str]) -> str:
    return f"{text} ({', '.join(options)})" if options else text


@dataclass(frozen=True)
class Full(Policy):
    """Every layer, every token: run { i : 1 <= i <= L }. Plain decoding through the engine, the baseline
    every other row's Speedup and % of full are measured against."""

    name = "full"
    title = "Full"
    baseline = True
    order = 0

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers))


class _TopBand:
    """What SkipDecode and HSD share: the band parameters (min, max) and the keep_first ablation, checked and shown
    the same way. A plain mixin (no dataclass fields), so each policy keeps its own field order."""

    def options(self) -> list[str]:
        return [f"keep_first={self.keep_first}"] if self.keep_first else []

    def validate(self, num_layers: int | None = None) -> None:
        check_band(self.min, self.max, num_layers)
        check_keep_first(self.keep_first, num_layers)


@dataclass(frozen=True)
class SkipDecode(_TopBand, Policy):
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
    title = "SkipDecode"
    order = 2
    style = ("tab:blue", "^")

    @property
    def label(self) -> str:
        return f"skipdecode({self.min:g},{self.max:g}{_suffix(self.options())})"

    @property
    def display_name(self) -> str:
        return f"SkipDecode ({fmt(self.min)},{fmt(self.max)}{_suffix(self.options(), ', ')})"

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        return _cached_skipdecode(step, max_steps, num_layers, self.min, self.max, self.keep_first)


@dataclass(frozen=True)
class HSD(_TopBand, Policy):
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
    title = "HSD"
    order = 3

    @property
    def style(self) -> tuple[str | None, str]:  # one line per s: the paper's two in its colours
        return {1: ("tab:red", "o"), 2: ("tab:orange", "s")}.get(self.s, (None, "o"))

    @property
    def label(self) -> str:
        return f"hsd(s={self.s},{self.min:g},{self.max:g}{_suffix(self.options())})"

    @property
    def display_name(self) -> str:
        return f"HSD (s={fmt(self.s)}, {fmt(self.min)}, {fmt(self.max)}{_suffix(self.options(), ', ')})"

    @property
    def plot_line(self) -> str:
        return _with_options(f"HSD s={fmt(self.s)}", self.options())

    def validate(self, num_layers: int | None = None) -> None:
        if not isinstance(self.s, int) or isinstance(self.s, bool) or self.s < 0:
            raise ConfigError(f"policy.s={self.s} is out of range: must be an integer >= 0")
        super().validate(num_layers)

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        return _cached_hsd(step, max_steps, num_layers, self.s, self.min, self.max, self.keep_first)


def _suffix(options: list[str], sep: str = ",") -> str:
    return "".join(sep + o for o in options)


@lru_cache(maxsize=65536)  # the engine asks once per token; this keeps the Python cost off the hot path
def _cached_skipdecode(step, max_steps, num_layers, lo, hi, keep_first) -> tuple[int, ...]:
    return tuple(sorted(top_band(step, max_steps, num_layers, lo, hi) | bottom_layers(keep_first)))


@lru_cache(maxsize=65536)
def _cached_hsd(step, max_steps, num_layers, s, lo, hi, keep_first) -> tuple[int, ...]:
    spaced = {i - 1 for i in range(1, num_layers + 1) if i % (s + 1) == 0}
    return tuple(sorted(spaced | top_band(step, max_steps, num_layers, lo, hi) | bottom_layers(keep_first)))


def build_policy(name: str, num_layers: int | None = None, **params) -> Policy:
    """Validate and build a policy: ``build_policy("hsd", s=1, min=0, max=18)``.

    ``num_layers`` (L, when known before loading the model) also checks ``max <= L``. All checks run
    before any model is loaded and raise ConfigError naming the parameter, its value and the valid range.
    """
    cls = policy_class(name)
    if cls is None:
        raise ConfigError(f"policy.name={name} is unknown; choose one of {', '.join(POLICIES)}")
    unknown = set(params) - set(cls.param_names()) - set(cls.objects)
    if unknown:
        raise ConfigError(
            f"policy '{name}' has no parameter(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(cls.param_names()) or 'none'}"
        )
    policy = cls(**params)
    policy.validate(num_layers)
    return policy


def policy_class(name: Any) -> type[Policy] | None:
    """The registered class of ``policy.name`` (None if unknown)."""
    return POLICIES.get(name) if isinstance(name, str) else None


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
