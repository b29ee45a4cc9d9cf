"""How the engine runs a decode forward for each kind of policy (hsd_exp.skip.modes): one runner class per kind.

    runner          plan(steps, tmax, cache, device)                 layer(idx, ...) (when the plan has a decider)
    StaticRunner    layers(T, Tmax, L) -> the plan; drops the        - (the plan alone: run, skip or a (Q,) mask)
                    skipped layers' K/V (monotone: never run again)
    StepRunner      begin_step(T, Tmax, L, readout) -> a LayerStep   runs(i) ? run, after_layer : K/V only;
                                                                     after layer L, the step's record
    TokenRunner     begin_forward(steps, device) -> a TokenRouting   decide(idx, h) -> (B, Q): run, mix or K/V only

The engine (hsd_exp.skip.engine) builds the one its policy's kind names, once; ``plan`` is asked in the decoder
stack's pre-hook for every decode forward (prompt forwards and ``run_layers`` ranges never reach it), ``layer``
by the layer wrappers while the current forward has a decider. State lives in ``engine.call`` (a CallState).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hsd_exp.skip.cache import SkipCache
from hsd_exp.skip.modes import PER_STEP, PER_TOKEN, STATIC
from hsd_exp.skip.partial import run_rows, write_kv_only

if TYPE_CHECKING:
    from hsd_exp.skip.engine import SkipEngine


class StaticRunner:
    """A static policy: the plan decides every layer before the stack runs."""

    def __init__(self, engine: SkipEngine):
        self.engine = engine

    def plan(self, steps: list[int], tmax: int, cache, device) -> None:
        e, L = self.engine, self.engine.L
        step = steps[-1]
        new_set = e.policy.layers(step, tmax, L)
        e.stats.record(new_set)
        if len(steps) == 1:  # cached decoding: whole layers run or are skipped
            run = set(new_set)
            plan = [i in run for i in range(L)]
            if cache is not None and len(run) < L and e.lossless is None:  # lossless: verification needs them
                self._drop_skipped_kv(cache, run)
        else:  # several positions (no-cache reference): per-position (Q,) masks
            sets = {t: set(e.policy.layers(t, tmax, L)) for t in set(steps) if t >= 0}
            plan = [torch.tensor([t < 0 or i in sets[t] for t in steps], device=device) for i in range(L)]
        e.call.begin_forward(step, plan)

    def _drop_skipped_kv(self, cache, run: set[int]) -> None:
        """Monotone policies never run a skipped layer again: its K/V is dead weight (memory, beam reorders)."""
        if not isinstance(cache, SkipCache):
            raise ValueError("layer skipping with a KV cache needs hsd_exp.skip.engine.SkipCache (generate() inside "
                             f"layer_skipping passes one): pass {self.engine.cache_kw}=SkipCache(config=model.config)")
        cache.drop(i for i in range(self.engine.L) if i not in run)


class StepRunner:
    """A per-step policy (CALM): a LayerStep decides each layer of one cached decode step as the layers run."""

    def __init__(self, engine: SkipEngine):
        self.engine = engine

    def plan(self, steps: list[int], tmax: int, cache, device) -> None:
        e = self.engine
        if len(steps) != 1 or cache is None:
            raise ValueError(f"policy '{e.policy.name}' needs cached decoding (use_cache=True), one token per step")
        e.call.begin_forward(steps[-1], [True] * e.L, e.policy.begin_step(steps[-1], tmax, e.L, e.readout))

    def layer(self, idx, layer, orig_forward, signature, h, args, kwargs):
        """One layer of the step (B rows, one query position: h is (B, 1, C))."""
        e, call = self.engine, self.engine.call
        i = idx + 1  # 1-indexed layer
        if call.decider.runs(i):
            out = orig_forward(h, *args, **kwargs)  # (B, 1, C)
            call.ran.append(idx)
            if i < e.L:  # after the last layer there is nothing left to decide
                call.decider.after_layer(i, h, out)
        else:  # the state passes through; the layer still writes its K/V from it (CALM's state propagation)
            write_kv_only(layer, e.layout, signature, h, args, kwargs)
            out = h
        if i == e.L:
            ran = tuple(call.ran)
            record = call.decider.record(ran)
            if record is not None:
                e.stats.calm_exits.append(record)
            e.stats.record(ran, kv_only=e.L - len(ran), evals=call.decider.evals)
        return out


class TokenRunner:
    """A per-token policy (a router, layer dropout): a TokenRouting decides per row and position, every forward."""

    def __init__(self, engine: SkipEngine):
        self.engine = engine

    def plan(self, steps: list[int], tmax: int, cache, device) -> None:
        e = self.engine
        e.call.begin_forward(steps[-1], [True] * e.L, e.policy.begin_forward(steps, device))

    def layer(self, idx, layer, orig_forward, signature, h, args, kwargs):
        """One layer: h (B, Q, C); each (row, position) runs or passes h through."""
        e = self.engine
        routing = e.call.decider
        run = routing.decide(idx, h)  # (B, Q) bool
        z = routing.gates.get(idx)  # training: the (B, Q) straight-through gate, else None
        ran = int(run.sum())  # one reduction (and one sync on a GPU) per layer
        if ran == 0:  # nobody runs: only the K/V write, so later tokens find the cache complete
            write_kv_only(layer, e.layout, signature, h, args, kwargs)
            out = h
        elif z is None and h.shape[1] == 1 and ran < run.numel():  # a batched decode step whose rows differ
            out = run_rows(layer, e.layout, signature, h, run[:, 0], args, kwargs)  # MLP for running rows only
        else:
            full = orig_forward(h, *args, **kwargs)  # (B, Q, C); writes K/V from h for every row
            out = full if ran == run.numel() else torch.where(run.unsqueeze(-1), full, h)
            if z is not None:  # training: out = h + z * (layer(h) - h) in value and gradient, skipped tokens too
                out = out + (z - z.detach()).unsqueeze(-1).to(out.dtype) * (full - h)
        if idx == e.L - 1 and e.call.step >= 0:  # the new token's (last position's) layers, per row
            e.stats.record_rows(routing.counts[:, -1].tolist(), routing.rows_per_layer(), e.call.step)
        return out


RUNNERS = {STATIC: StaticRunner, PER_STEP: StepRunner, PER_TOKEN: TokenRunner}

__all__ = ["RUNNERS", "StaticRunner", "StepRunner", "TokenRunner"]
