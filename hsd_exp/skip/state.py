"""The engine's state: what it knows of the current call, and the ``run_layers`` block its forwards run in.

One ``CallState`` per generate() call (or per cache-less forward outside one): the engine makes a fresh one when
a call starts and again when it ends, so nothing carries from one batch into the next (the evaluation keeps one
context open over every batch; state carried over once ran CALM's exit rule on later batches' prompts). Its
per-forward part (T, the plan, the step's decider) is set by ``begin_forward`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class CallState:
    """One generate() call (or one cache-less forward outside one): where its prompt ends, which token it is at."""

    tmax: int | None = None  # the policies' Tmax for this call; None outside generate() (the engine's own)
    prompt_len: int | None = None  # where generated tokens start (T = position - prompt_len); the prefill sets it
    step: int = -1  # T of the current forward's last position; -1 in the prefill
    plan: list = field(default_factory=list)  # per layer: True (run), False (skip) or a (Q,) bool tensor
    decider: Any = None  # the forward's LayerStep (per-step) or TokenRouting (per-token); None: the plan decides
    ran: list[int] = field(default_factory=list)  # layers (0-based) the per-step decider has run so far

    def begin_forward(self, step: int, plan: list, decider: Any = None) -> None:
        """A forward starts: its T (last position), its plan and its decider; nothing of the last forward's left."""
        self.step, self.plan, self.decider, self.ran = step, plan, decider, []


@dataclass
class LayerScope:
    """A ``run_layers`` block: which layers its forwards run, and the states captured or fed at a layer."""

    layers: range | None  # 0-based; None: the policy decides (and the stats record it)
    capture_at: int | None = None  # collect the (B, Q, C) state entering this layer, one per forward
    feed: torch.Tensor | None = None  # (B, Q, C): the input state of ``layers``' first layer
    captured: list = field(default_factory=list)

    @property
    def feed_at(self) -> int | None:
        return self.layers.start if self.feed is not None else None


__all__ = ["CallState", "LayerScope"]
