"""Time per decode step, measured inside ``generate()``, so that output length cannot move a run's speed.

tokens/s counts tokens up to each row's EOS: in a batch, a policy that writes long garbage keeps every row busy
while full decoding pads its finished rows, so garbage reads fast. What one decode step of the batch costs does
not depend on how many rows still write real tokens. ``StepTimer`` is a logits processor: ``generate()`` calls its
processors once per step, right after that step's forward (greedy, sampling and beam search alike), so with
t_0 the call's start and t_1..t_N its N calls (N = the batch's generated length)

    prefill seconds        = t_1 - t_0                (the prompt pass, timed apart)
    seconds per decode step = (t_N - t_1) / (N - 1)   (calls 1..N bracket the N - 1 decode forwards)

It returns the scores untouched, so the tokens are those of a run without it. On CUDA it waits for the device
before reading the clock (``generate()`` already syncs once per step to test its stopping criteria, so this adds
next to nothing), else a timestamp would be taken while the step's kernels still run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import LogitsProcessor


class StepTimer(LogitsProcessor):
    """Timestamps of one ``generate()`` call's steps; ``start()`` before the call, then read the properties."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.t0: float | None = None
        self.stamps: list[float] = []  # one per processor call: after the prefill, then after each decode forward

    def start(self) -> None:
        self.t0, self.stamps = self.clock(), []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.stamps.append(self.clock())
        return scores

    @property
    def prefill_seconds(self) -> float | None:
        """t_1 - t_0; None when no step ran (or ``start`` was not called)."""
        return self.stamps[0] - self.t0 if self.stamps and self.t0 is not None else None

    @property
    def decode_steps(self) -> int:
        """N - 1: the decode forwards of the batch (every row takes part in each, finished or not)."""
        return max(len(self.stamps) - 1, 0)

    @property
    def decode_seconds(self) -> float:
        """t_N - t_1: the decode forwards' time (0.0 when there were none)."""
        return self.stamps[-1] - self.stamps[0] if self.decode_steps else 0.0
