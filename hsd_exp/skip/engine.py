"""The layer-skip engine: applies a skip policy inside Hugging Face ``generate()``.

    with layer_skipping(model, build_policy("hsd", s=1, min=0, max=18), max_new_tokens=64) as stats:
        model.generate(**inputs, max_new_tokens=64)
    stats.avg_layers  # the paper's "Avg. Layer": decoder layers run per generated token, prefill excluded

How it works, without copying model code:
1. Each decoder layer's ``forward`` is wrapped (an instance attribute, removed on exit). A skipped layer
   returns its input hidden state untouched: no compute and no K/V write.
2. A forward pre-hook on the decoder stack works out which generated token each query position holds
   (T = position - prompt length), then asks the policy through the protocol of its ``kind``
   (hsd_exp.skip.modes), by the runner of that kind (hsd_exp.skip.runners), picked once, when the engine is built:
     static     ``layers(T, Tmax, L)`` gives the plan: per layer True (run), False (skip) or a (Q,) mask;
     per_step   ``begin_step(...)`` gives a LayerStep the wrappers ask as the layers run (CALM);
     per_token  ``begin_forward(...)`` gives a TokenRouting the wrappers ask per row and position (a router).
   Prompt forwards (prefill) run every layer, whatever the kind.
3. transformers derives the mask size and the number of new input tokens from layer 0's cache length. HSD
   skips layer 1 for every generated token, so layer 0's cache falls behind and generation would be silently
   corrupted. ``SkipCache`` reports the true length: the longest layer cache. Exact because static policies are
   monotone (set(T+1) is a subset of set(T)): a layer that runs holds K/V for every earlier position, and a
   layer once skipped never runs again, so its cache is dropped (no memory, no beam-search reorder copies).
4. Several query positions without a cache (``generate(use_cache=False)``, the no-cache reference, a training
   batch with a fixed ``prompt_len``) run every layer on the whole sequence and keep, per position, the layer's
   output only where that position's own set includes it (``torch.where``). Outside generate() a cache-less
   forward is a new prompt.
5. Per step (one cached token, B rows): layer i runs while ``step.runs(i)`` (then ``step.after_layer(i, h_in,
   h_out)`` for i < L); a layer it skips passes the state on and writes only its K/V from it (``write_kv_only``),
   so later tokens find a complete cache. After layer L, ``step.evals`` and ``step.record(ran)`` go to SkipStats.
6. Per token: ``decide(idx, h)`` gives a (B, Q) run mask. Skipping rows keep their input and only write their
   K/V (hsd_exp.skip.partial: the K/V alone when no row runs; in a batched decode step where some do, the
   attention block for every row and the MLP for the running ones). Several positions run the whole layer and
   keep its output where the position runs; while a router trains, its straight-through gate joins that mix.
7. What the engine knows of a call is one ``CallState`` (hsd_exp.skip.state): a fresh one when a generate()
   call starts and when it ends, so one context serves a whole evaluation loop; its per-forward part (T, plan,
   the step's decider) is set in one place, ``CallState.begin_forward``.
8. Lossless mode (``lossless=LosslessSettings(...)``) replaces generate() with rounds of draft and verify
   (hsd_exp.skip.rounds, drafts from ``draft_class``). They reach the engine through ``run_layers(layers,
   capture_at, feed)`` alone: drafts run under the policy (skipped layers' caches kept, not dropped), prefill and
   verification a fixed range of layers, recording nothing; ``capture_at=E`` collects the states entering layer
   E + 1 and ``feed`` hands them to the range's first layer (verification above the drafts' exact bottom).

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache`` (of ``generate()``, the model
forwards and the layers); the engine reads the name off the model's ``forward`` signature, so both work.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from types import MethodType

import torch

from hsd_exp.errors import ConfigError
from hsd_exp.models.layout import decoder_layers, layout_of, readout, submodule, unwrap
from hsd_exp.skip.cache import SkipCache, cache_argument
from hsd_exp.skip.drafts import PolicyDraft
from hsd_exp.skip.lossless import (
    LosslessSettings,
    LosslessStats,
    check_arguments,
    check_generation,
    effective_config,
)
from hsd_exp.skip.policies import Policy
from hsd_exp.skip.rounds import lossless_generate
from hsd_exp.skip.runners import RUNNERS
from hsd_exp.skip.state import CallState, LayerScope
from hsd_exp.skip.stats import SkipStats


class SkipEngine:
    """Installs the wrappers; see the module docstring. Use through ``layer_skipping``."""

    def __init__(self, model, policy: Policy, max_new_tokens: int | None = None, prompt_len: int | None = None,
                 lossless: LosslessSettings | None = None):
        self.model = unwrap(model)
        self.layout = layout_of(self.model)
        self.layers = decoder_layers(self.model)
        self.stack = submodule(self.model, self.layout.stack)
        self.L = len(self.layers)
        policy.validate(self.L)
        self.policy = policy
        self.max_new_tokens = max_new_tokens
        self.stats = SkipStats(num_layers=self.L)
        self.cache_kw = cache_argument(self.model)
        self.readout = readout(self.model)  # (B, C) -> (B, V): what a per-step policy may score
        self.fixed_prompt_len = prompt_len  # training: batches laid out with every prompt ending at one column
        self.lossless = lossless  # generate() drafts with the policy, the full model verifies (None: plain)
        self.draft_class = PolicyDraft  # lossless: the draft strategy (hsd_exp.skip.drafts) each call builds
        if lossless is not None:
            self.stats.lossless = LosslessStats()
        self.runner = RUNNERS[policy.kind](self)  # the policy's kind picks, once, how decode steps are run
        self.call = self._new_call()
        self.scope: LayerScope | None = None  # the innermost run_layers block
        self._handles: list = []
        self._saved: list = []  # (object, attribute, previous instance value or None)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        # Remember any instance attribute we shadow (an outer context's wrapper, an accelerate hook) to restore it.
        for idx, layer in enumerate(self.layers):
            self._saved.append((layer, "forward", layer.__dict__.get("forward")))
            layer.forward = MethodType(self._layer_forward(idx, layer.forward), layer)
        self._handles.append(self.stack.register_forward_pre_hook(self._before_stack, with_kwargs=True))
        self._saved.append((self.model, "generate", self.model.__dict__.get("generate")))
        self._orig_generate = self.model.generate
        self.model.generate = self._generate

    def remove(self) -> None:
        for obj, name, previous in reversed(self._saved):
            if previous is None:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, previous)
        self._saved.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ generate(): one call = one batch
    def _new_call(self, tmax: int | None = None) -> CallState:
        return CallState(tmax=tmax, plan=[True] * self.L)

    @contextmanager
    def _one_call(self, tmax: int):
        """A call starts with its prompt (prefill); after it, a plain forward in the context is a new prompt."""
        self.call = self._new_call(tmax)
        self.stats.last_call, self.stats.last_call_rows = [], []
        try:
            yield
        finally:
            self.call = self._new_call()

    def _generate(self, *args, **kwargs):
        gen_config = kwargs.get("generation_config") or self.model.generation_config
        asked = kwargs.get("max_new_tokens") or gen_config.max_new_tokens  # this call's own length
        tmax = self.max_new_tokens or asked
        if not tmax:
            raise ValueError("layer_skipping needs max_new_tokens (the policies' Tmax): pass it to either")
        if asked and asked > tmax:  # tokens T >= Tmax would run a schedule past its end (HSD's band below min)
            raise ConfigError(f"generate(max_new_tokens={asked}) inside layer_skipping(max_new_tokens={tmax}): the "
                              f"policy's schedule covers {tmax} tokens; pass layer_skipping(max_new_tokens={asked}) "
                              f"(or None: each call's own length), or generate at most {tmax} tokens")
        with self._one_call(tmax):
            if self.lossless is not None:  # rounds of draft and verify (hsd_exp.skip.rounds) instead of generate()
                if len(args) > 1:
                    raise ConfigError(f"lossless decoding takes generate()'s input ids alone by position (got "
                                      f"{len(args)} positional arguments): pass the rest by keyword")
                gen, rest = effective_config(self.model, dict(kwargs))
                check_generation(gen)
                call = check_arguments(rest)
                input_ids = args[0] if args else call.pop("input_ids")
                return lossless_generate(self, input_ids, call.pop("attention_mask", None), gen, self.lossless,
                                         self.draft_class, **call)
            use_cache = kwargs.get("use_cache", gen_config.use_cache)
            if use_cache is not False and kwargs.get(self.cache_kw) is None:  # None = generate()'s default: cached
                # Layer 0 may be skipped: give generate() a cache that reports the true length.
                kwargs[self.cache_kw] = SkipCache(config=self.model.config)
            return self._orig_generate(*args, **kwargs)

    @contextmanager
    def run_layers(self, layers: range | None = None, capture_at: int | None = None,
                   feed: torch.Tensor | None = None):
        """Forwards inside run exactly ``layers`` (0-based, recording nothing; None: the policy decides, recorded).
        ``capture_at=E``: yields the list that collects the (B, Q, C) state entering layer E of each forward;
        ``feed`` (B, Q, C): the state ``layers``' first layer takes instead of its input (the layers below it
        do not run). Blocks nest; the innermost one applies."""
        if feed is not None and not layers:
            raise ValueError("run_layers(feed=...) needs the layers it feeds (a range whose first layer takes it)")
        saved, self.scope = self.scope, LayerScope(layers, capture_at, feed)
        try:
            yield self.scope.captured
        finally:
            self.scope = saved

    # ------------------------------------------------------------------ before the layers: make the plan
    def _before_stack(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        q = x.shape[1]  # query positions in this forward; x is (B, Q) ids or (B, Q, C) embeddings
        cache = kwargs.get(self.cache_kw)
        past = cache.get_seq_length() if cache is not None else 0
        call = self.call
        if self.fixed_prompt_len is not None:
            call.prompt_len = self.fixed_prompt_len
        elif past == 0 and (cache is not None or call.tmax is None or call.prompt_len is None):
            # A new prompt: prefill. Only generate(use_cache=False) feeds one sequence cache-less step after
            # step; outside generate() every cache-less forward is a prompt of its own.
            call.prompt_len = q
        elif call.prompt_len is None:  # past > 0: a cache filled before the engine saw its prompt
            raise ValueError(
                f"layer_skipping got a KV cache already holding {past} positions at the start of a call: the "
                "policies count generated tokens from the end of the prompt (T = position - prompt length), "
                "so generate() inside the context must start from an empty cache (it prefills the prompt); "
                f"pass no {self.cache_kw} (the engine gives generate() a fresh SkipCache)"
            )
        tmax = call.tmax or self.max_new_tokens
        steps = [p - call.prompt_len for p in range(past, past + q)]  # T of each query position

        if self.scope is not None and self.scope.layers is not None:  # a fixed range (lossless prefill / verify)
            call.begin_forward(steps[-1], [i in self.scope.layers for i in range(self.L)])
            return None
        if steps[-1] < 0:  # prefill: every layer
            self.stats.prefill_tokens += x.shape[0] * q
            call.begin_forward(-1, [True] * self.L)
            return None
        if tmax is None:
            raise ValueError("layer_skipping needs max_new_tokens when used outside generate()")
        self.stats.decode_rows += x.shape[0]
        self.runner.plan(steps, tmax, cache, x.device)
        return None

    # ------------------------------------------------------------------ one decoder layer
    def _layer_forward(self, idx: int, orig_forward):
        engine = self
        signature = inspect.signature(orig_forward)

        def forward(layer, hidden_states, *args, **kwargs):
            scope = engine.scope
            if scope is not None:  # run_layers: the state entering this layer, fed back or kept
                if idx == scope.feed_at:
                    hidden_states = scope.feed
                if idx == scope.capture_at:
                    scope.captured.append(hidden_states)
            call = engine.call
            if call.decider is not None:
                return engine.runner.layer(idx, layer, orig_forward, signature, hidden_states, args, kwargs)
            plan = call.plan[idx]
            if plan is True:
                return orig_forward(hidden_states, *args, **kwargs)
            if plan is False:
                return hidden_states  # skipped: the residual stream passes through untouched
            out = orig_forward(hidden_states, *args, **kwargs)  # (B, Q, C)
            return torch.where(plan.view(1, -1, 1), out, hidden_states)

        return forward


@contextmanager
def layer_skipping(model, policy: Policy, max_new_tokens: int | None = None, prompt_len: int | None = None,
                   lossless: bool | LosslessSettings | None = False, draft_len: int = 4,
                   draft_confidence: float | None = None):
    """Apply ``policy`` to every ``model.generate()`` (and forward) inside the block; yields SkipStats.

    ``max_new_tokens`` is the policies' Tmax; when None, each generate() call's own max_new_tokens is used. A
    generate() call asking for more new tokens than it is refused (ConfigError): its schedule ends at Tmax.
    ``prompt_len`` fixes where generated tokens start for plain forwards (skip-aware training batches).
    ``lossless`` (True or a LosslessSettings; False / None: plain skipping): the policy drafts ``draft_len``
    tokens per round and the full model verifies them, so greedy generate() returns exactly plain generate()'s
    tokens and sampling follows the full model's distribution (hsd_exp.skip.lossless; ``stats.lossless`` counts
    drafts, acceptance and verifications); ``draft_confidence`` (None = off) ends a round's drafting early once
    some row's draft has its top probability below it. Pass ``lossless=LosslessSettings(draft_len,
    draft_confidence)`` or ``lossless=True`` with the two keywords.
    On exit the model is exactly as before (plain ``generate()`` again), even after an exception.
    """
    if isinstance(lossless, LosslessSettings):
        if (draft_len, draft_confidence) != (4, None):
            raise ValueError("layer_skipping: pass draft_len / draft_confidence inside LosslessSettings, not beside it")
        settings = lossless
    else:
        settings = LosslessSettings(draft_len, draft_confidence) if lossless else None  # checks both values
    engine = SkipEngine(model, policy, max_new_tokens, prompt_len, settings)
    try:
        engine.install()
        yield engine.stats
    finally:
        engine.remove()
