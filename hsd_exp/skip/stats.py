"""What the engine ran: layers per generated token, the paper's Avg. Layer, and what a FLOP model needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hsd_exp.skip.calm import CalmExit


@dataclass
class SkipStats:
    """What the engine ran, per processed generated token (decode step), prefill excluded.

    ``avg_layers`` = mean of ``per_step``: the paper's "Avg. Layer". For CALM a step's count is its exit layer
    e (layers 1..e, the exit layer included). The layers above the exit do not count, yet they are not free:
    each still writes K/V from the propagated state (hsd_exp.skip.partial: the K/V projections on LLaMA-layout
    models, the whole attention block on others), and their number is ``kv_only``. ``hsd_exp.bench``'s FLOP
    model adds that cost and one LM head per confidence check (``confidence_evals``; for ``state`` too, an
    upper bound); Avg. Layer leaves both out.
    CALM in a batch (and across beams) takes one exit per step for all rows, when the least confident row is
    confident; rows already finished (padding after their EOS) still take part in that minimum.
    A per-token policy (SkipLayer) lets rows differ: ``last_call_rows`` holds each row's count per step, and
    ``per_step`` / ``kv_only`` their mean (the rest of a step's L layers only wrote K/V for that row);
    ``layer_rows`` holds, per step, how many rows ran each layer (what the engine computed: see hsd_exp.bench).
    """

    num_layers: int
    per_step: list[int] = field(default_factory=list)  # layers run per processed generated token
    step_layers: list[tuple[int, ...]] = field(default_factory=list)  # which (0-based), same order
    kv_only: list[int] = field(default_factory=list)  # per-step: layers that only wrote K/V, per token
    confidence_evals: list[int] = field(default_factory=list)  # per-step: exit checks computed, per token
    calm_exits: list[CalmExit] = field(default_factory=list)  # per-step: each step's record (CALM)
    last_call: list[int] = field(default_factory=list)  # per_step of the most recent generate() call
    last_call_rows: list[list[int]] = field(default_factory=list)  # per-token policies: per step, per row
    layer_rows: list[tuple[int, ...]] = field(default_factory=list)  # per-token policies: per step, per layer
    runs_by_token: dict[int, list[int]] = field(default_factory=dict)  # per-token: T -> rows that ran each layer
    rows_by_token: dict[int, int] = field(default_factory=dict)  # per-token: T -> rows decoded at T
    lossless: Any = None  # lossless mode: its LosslessStats (drafted, accepted, verifications)
    prefill_tokens: int = 0  # prompt positions processed with every layer (B * prompt length, summed)
    decode_rows: int = 0  # rows (batch x beams) per decode step, summed over steps

    @property
    def avg_layers(self) -> float:
        """Mean layers per decode step; NaN when no decode step ran (max_new_tokens=1: prefill only)."""
        return sum(self.per_step) / len(self.per_step) if self.per_step else float("nan")

    def record(self, layer_set: tuple[int, ...], kv_only: int = 0, evals: int = 0) -> None:
        self.per_step.append(len(layer_set))
        self.step_layers.append(tuple(layer_set))
        self.kv_only.append(kv_only)
        self.confidence_evals.append(evals)
        self.last_call.append(len(layer_set))

    def record_rows(self, counts: list[int], layer_rows: list[int] | None = None, token: int | None = None) -> None:
        """A per-token policy's step (generated token ``token``): layers run by each row (rows differ), and rows
        that ran each layer; per_step holds the rows' mean."""
        mean = sum(counts) / len(counts)
        self.per_step.append(mean)
        self.step_layers.append(())
        self.kv_only.append(self.num_layers - mean)
        self.confidence_evals.append(0)
        self.last_call.append(mean)
        self.last_call_rows.append(list(counts))
        self.layer_rows.append(tuple(layer_rows or ()))
        if layer_rows and token is not None:
            acc = self.runs_by_token.setdefault(token, [0] * len(layer_rows))
            self.runs_by_token[token] = [a + n for a, n in zip(acc, layer_rows, strict=True)]
            self.rows_by_token[token] = self.rows_by_token.get(token, 0) + len(counts)

    def run_rates(self) -> list[list[float]]:
        """Per-token policies: the share of rows that ran layer l (rows) at generated token T (columns), (L, Tmax)
        over every decode step recorded; [] when nothing was recorded per row."""
        if not self.runs_by_token:
            return []
        tokens = range(max(self.runs_by_token) + 1)
        return [[self.runs_by_token[t][i] / self.rows_by_token[t] if t in self.runs_by_token else float("nan")
                 for t in tokens] for i in range(self.num_layers)]
