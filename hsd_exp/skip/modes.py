"""The three kinds of skip policy the engine serves, as protocols: what the engine asks each kind, and when.

    kind         decides                            the engine asks                       e.g.
    "static"     from (T, Tmax, L) alone, ahead     layers(T, Tmax, L) once per step      Full, SkipDecode, HSD
    "per_step"   as the layers of a step run        begin_step(...) -> runs(i), ...       CALM
    "per_token"  per row and position, every fwd    begin_forward(...) -> decide(idx, h)  SkipLayer's router

A policy states its kind as a class attribute (``Policy.kind``); the engine picks its planner from it once, when it
is built (hsd_exp.skip.engine), so no flag is looked up while decoding. ``Policy.static`` (kind == "static") stays
for the readers that only ask "can this run ahead of time?" (skip-aware training, lossless mode's exact bottom).
No torch here: the report imports the policies, and they import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

STATIC, PER_STEP, PER_TOKEN = "static", "per_step", "per_token"
KINDS = (STATIC, PER_STEP, PER_TOKEN)


class StaticPolicy(Protocol):
    """Decides from (T, Tmax, L) alone. Must be monotone in T (set(T+1) is a subset of set(T)), which keeps the
    cache exact while skipped layers' K/V are dropped (``tests/skip/test_policies.py`` checks every setting)."""

    kind: ClassVar[str]  # STATIC

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        """The sorted 0-based layers generated token ``step`` (T) of ``max_steps`` (Tmax) runs."""
        ...


class LayerStep(Protocol):
    """One cached decode step of a per-step policy (B rows, one query position), asked layer by layer."""

    @property
    def evals(self) -> int:
        """Checks computed this step (the FLOP model charges an LM head each)."""
        ...

    def runs(self, layer: int) -> bool:
        """Run 1-indexed ``layer``? False: it passes its input on and only writes its K/V from it."""
        ...

    def after_layer(self, layer: int, h_in: Any, h_out: Any) -> None:
        """1-indexed ``layer`` < L ran, h_in -> h_out (B, 1, C): look at the result (e.g. decide to exit)."""
        ...

    def record(self, ran: tuple[int, ...]) -> Any:
        """The step's own trace (CALM: a CalmExit, into SkipStats.calm_exits), or None; ``ran``: 0-based layers."""
        ...


class StepPolicy(Protocol):
    """Decides inside each cached decode step, one token per step (CALM)."""

    kind: ClassVar[str]  # PER_STEP

    def begin_step(self, step: int, max_steps: int, num_layers: int, readout: Callable) -> LayerStep:
        """The object deciding step T; ``readout`` maps a (B, C) state to (B, V) logits (final norm + LM head)."""
        ...


class TokenRouting(Protocol):
    """One forward of a per-token policy: a (B, Q) run mask per layer, asked as the layers come."""

    gates: dict  # training: layer idx -> (B, Q) straight-through gate (the engine mixes it in); {} otherwise

    def decide(self, idx: int, h: Any) -> Any:
        """(B, Q) bool: which rows and positions run 0-based layer ``idx``, whose input is h (B, Q, C)."""
        ...

    @property
    def counts(self) -> Any:
        """(B, Q) layers run so far per row and position."""
        ...

    def rows_per_layer(self) -> list[int]:
        """For each layer so far, the rows that ran it at the last position."""
        ...


class TokenPolicy(Protocol):
    """Decides per row and position in every forward, cached or not (SkipLayer's router, layer dropout)."""

    kind: ClassVar[str]  # PER_TOKEN

    def begin_forward(self, steps: list[int], device: Any) -> TokenRouting:
        """The routing of one forward whose query positions hold generated tokens ``steps`` (T < 0: prompt)."""
        ...


__all__ = ["KINDS", "PER_STEP", "PER_TOKEN", "STATIC", "LayerStep", "StaticPolicy", "StepPolicy", "TokenPolicy",
           "TokenRouting"]
