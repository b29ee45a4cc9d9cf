"""CALM early exit (Schuster et al. 2022), as the HSD paper ran it: the policy, its confidence and exit rule.

The engine (hsd_exp.skip.engine) runs the layers; this module decides. For each decode step the engine calls
``CALM.begin_step``; the returned ``CalmStep`` runs layers until the batch is confident (``runs``), scoring each
layer's output as it comes (``after_layer``). The layers above the exit then only write their K/V
(``hsd_exp.skip.partial.write_kv_only``). torch is imported where the math runs, so the report can import this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hsd_exp.errors import ConfigError
from hsd_exp.skip.modes import PER_STEP
from hsd_exp.skip.params import check_number, fmt
from hsd_exp.skip.policies import Policy

CRITERIA = ("softmax", "state")


@dataclass(frozen=True)
class CALM(Policy):
    """CALM early exit. After each layer i >= ``first_exit`` (1-indexed) of a generated token, a confidence
    c_i is computed and the token exits when c_i >= lambda_i, with the depth-decreasing threshold

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
    title = "CALM"
    kind = PER_STEP  # decides as the layers of each decode step run (hsd_exp.skip.modes)
    order = 1
    style = ("tab:green", "D")

    def options(self) -> list[str]:
        extra = [] if self.first_exit == 1 else [f"first_exit={self.first_exit}"]
        return extra + ([f"decay(tau={self.tau:g})"] if self.decay else [])

    @property
    def variant(self) -> bool:  # the paper ran softmax: the state criterion is drawn as a variant too
        return self.criterion != "softmax" or bool(self.options())

    @property
    def label(self) -> str:
        return f"calm(d={self.d:g},{self.criterion}{''.join(',' + o for o in self.options())})"

    @property
    def display_name(self) -> str:  # the criterion only when it is not the paper's softmax
        parts = [f"d={fmt(self.d)}", *([self.criterion] if self.criterion != "softmax" else []), *self.options()]
        return f"CALM ({', '.join(parts)})"

    @property
    def plot_line(self) -> str:
        line = "CALM" if self.criterion == "softmax" else f"CALM ({self.criterion})"
        return f"{line} ({', '.join(self.options())})" if self.options() else line

    def validate(self, num_layers: int | None = None) -> None:
        check_number("d", self.d, "a number > 0 (the paper uses 0.02 and 0.005)")
        if not 0 < self.d <= 1:  # d > 1: lambda_1 = clip(1 - d, 0, 1) = 0, every token exits at first_exit
            raise ConfigError(f"policy.d={self.d} is out of range: must be in (0, 1] (lambda_i = clip(1 - d*i, 0, "
                              "1); at d = 1 every token already exits at first_exit); the paper uses 0.02 and 0.005")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"policy.criterion={self.criterion} is unknown; choose one of {', '.join(CRITERIA)}")
        first = self.first_exit
        if not isinstance(first, int) or isinstance(first, bool) or first < 1:
            raise ConfigError(f"policy.first_exit={first} is out of range: must be an integer >= 1 "
                              "(the 1-indexed first layer that may exit, <= L)")
        check_number("tau", self.tau, "a number >= 0 (the position decay's rate; CALM uses 4)")
        if self.tau < 0:
            raise ConfigError(f"policy.tau={self.tau:g} is out of range: must be >= 0 "
                              "(the position decay's rate; CALM uses 4)")
        if not isinstance(self.decay, bool):  # a string "no" would otherwise switch the decay on
            raise ConfigError(f"policy.decay={self.decay!r} must be true or false (CALM's position decay)")
        if num_layers is not None and not first <= num_layers:
            raise ConfigError(f"policy.first_exit={first} is out of range: must be in [1, {num_layers}]")

    def threshold(self, layer: int, step: int, max_steps: int) -> float:
        """lambda for 1-indexed ``layer`` at generated-token index ``step``."""
        lam = min(max(1.0 - self.d * layer, 0.0), 1.0)
        if self.decay:
            lam = 0.9 * lam + 0.1 * math.exp(-self.tau * step / max(max_steps, 1))
        return min(max(lam, 0.0), 1.0)

    def begin_step(self, step: int, max_steps: int, num_layers: int, readout: Callable) -> CalmStep:
        return CalmStep(self, step, max_steps, readout)


def confidence(criterion: str, h_in, h_out, readout: Callable):
    """c_i per row, (B,): softmax top1 - top2 of readout(h_i) = lm_head(final_norm(h_i)), or cos(h_i, h_{i-1})."""
    import torch.nn.functional as F

    if criterion == "softmax":
        probs = F.softmax(readout(h_out[:, -1]).float(), dim=-1)  # (B, V)
        top2 = probs.topk(2, dim=-1).values  # (B, 2)
        return top2[:, 0] - top2[:, 1]  # (B,)
    return F.cosine_similarity(h_out[:, -1].float(), h_in[:, -1].float(), dim=-1)  # (B,)


def batch_exits(conf, lam: float) -> tuple[float, bool]:
    """t5x's rule: the batch exits when its least confident row is confident. Returns (min_b c_b, exit?)."""
    least = conf.min().item()
    return least, least >= lam


@dataclass
class CalmExit:
    """CALM's decision for one generated token: the confidences seen and where it exited (1-indexed)."""

    step: int
    exit_layer: int
    confidences: list[float]  # min over rows, for layers first_exit..exit_layer
    thresholds: list[float]


@dataclass
class CalmStep:
    """One decode step under CALM: the confidences so far and the exit decision after each layer."""

    policy: CALM
    step: int
    max_steps: int
    readout: Callable  # h (B, C) -> logits (B, V): lm_head(final_norm(h))
    confidences: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    exited: bool = False

    def runs(self, layer: int) -> bool:
        """Layers up to the exit run; the ones above it only write K/V (the engine's part)."""
        return not self.exited

    def after_layer(self, layer: int, h_in, h_out) -> None:
        """After 1-indexed ``layer`` < L ran (h_in -> h_out, (B, 1, C)): exit here if the whole batch is confident."""
        if layer < self.policy.first_exit:
            return
        conf = confidence(self.policy.criterion, h_in, h_out, self.readout)  # (B,)
        lam = self.policy.threshold(layer, self.step, self.max_steps)
        least, self.exited = batch_exits(conf, lam)
        self.confidences.append(least)
        self.thresholds.append(lam)

    @property
    def evals(self) -> int:  # confidence computations this step (bench's FLOP model charges an LM head each)
        return len(self.confidences)

    def record(self, ran: tuple[int, ...]) -> CalmExit:
        """The step's trace; the exit layer is the last (1-indexed) layer that ran."""
        return CalmExit(self.step, ran[-1] + 1, self.confidences, self.thresholds)
