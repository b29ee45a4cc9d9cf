"""The layer-skip engine: applies a skip policy inside Hugging Face ``generate()``.

    with layer_skipping(model, build_policy("hsd", s=1, min=0, max=18), max_new_tokens=64) as stats:
        model.generate(**inputs, max_new_tokens=64)
    stats.avg_layers  # the paper's "Avg. Layer": decoder layers run per generated token, prefill excluded

How it works, without copying model code:
1. Each decoder layer's ``forward`` is wrapped (an instance attribute, removed on exit). A skipped layer
   returns its input hidden state untouched: no compute and no K/V write.
2. A forward pre-hook on the decoder stack works out, before the layers run, which generated token each
   query position holds (T = position - prompt length) and so which layers run for it (the "plan").
3. transformers derives the mask size and the number of new input tokens from the cache length of layer 0
   (``cache.get_seq_length()``). HSD skips layer 1 for every generated token, so layer 0's cache falls
   behind and generation would be silently corrupted. ``SkipCache`` reports the true length: the longest
   layer cache. Exact because static policies are monotone (the set run at T+1 is a subset of the set at
   T): a layer that runs holds K/V for every earlier position, and a layer once skipped never runs again,
   so its cache is dropped (no memory, no beam-search reorder copies).
4. Several query positions at once without a cache (``generate(use_cache=False)``, the no-cache reference,
   or a training batch with a fixed ``prompt_len``) run every layer on the whole sequence and keep, per
   position, the layer's output only where that position's own set includes the layer (``torch.where``):
   each position runs exactly its own layer set. Outside generate() a cache-less forward is a new prompt.
5. A dynamic policy (``policy.static`` False, e.g. CALM in hsd_exp.skip.calm) decides inside each cached
   decode step. ``policy.begin_step(T, Tmax, L, readout)`` returns a step object; for each layer i (1-indexed)
   the engine asks ``step.runs(i)``: True runs the layer (then, for i < L, ``step.after_layer(i, h_in, h_out)``
   lets it look at the result), False passes the state through and writes only the layer's K/V from it
   (``write_kv_only``), so later tokens find a complete cache. After layer L, ``step.evals`` (the checks it
   computed) and ``step.record(ran)`` (its own trace, e.g. CalmExit) go into SkipStats.
6. A per-token policy (``policy.per_token``, SkipLayer's router in hsd_exp.skip.skiplayer) decides per row and
   position: ``policy.begin_forward(steps, device)`` returns a step whose ``decide(idx, h)`` gives a (B, Q)
   run mask for each layer. Rows that skip keep their input state and only write their K/V (hsd_exp.skip.partial):
   when no row runs, the K/V alone; in a batched decode step where some rows run, the attention block for every
   row and the MLP for the running rows only. Several positions (no-cache reference, training) run the whole
   layer and keep its output where the position runs; while the router trains, the straight-through gate joins
   that mix, so its gradient flows at every routed position, skipped ones included.
7. Lossless mode (``lossless=True``, hsd_exp.skip.lossless) replaces generate() with a draft-and-verify loop: draft
   forwards run under the policy as above (skipped layers' caches are kept, not dropped), prefill and verify
   forwards run a fixed range of layers (``run_layers``: every layer, or only those above the draft's exact
   bottom layers, whose input state the drafts left at layer E: ``capture`` records it, ``feed`` hands it back),
   and the cache is cut back to the full model's K/V between them.

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache`` (of ``generate()``, the
model forwards and the layers); the engine reads the name off the model's ``forward`` signature, so both work.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from types import MethodType

import torch

from hsd_exp.families import decoder_layers, family_of, readout, submodule, unwrap
from hsd_exp.skip.cache import SkipCache, cache_argument
from hsd_exp.skip.lossless import LosslessStats, check_lossless, effective_config, lossless_generate
from hsd_exp.skip.partial import run_rows, write_kv_only
from hsd_exp.skip.policies import Policy
from hsd_exp.skip.stats import SkipStats


class SkipEngine:
    """Installs the wrappers; see the module docstring. Use through ``layer_skipping``."""

    def __init__(self, model, policy: Policy, max_new_tokens: int | None = None, prompt_len: int | None = None,
                 lossless: bool = False, draft_len: int = 4, draft_confidence: float | None = None):
        self.model = unwrap(model)
        self.family = family_of(self.model)
        self.layers = decoder_layers(self.model)
        self.L = len(self.layers)
        policy.validate(self.L)
        self.policy = policy
        self.max_new_tokens = max_new_tokens
        self.stats = SkipStats(num_layers=self.L)
        self.cache_kw = cache_argument(self.model)
        self.readout = readout(self.model)  # (B, C) -> (B, V): what a dynamic policy may score
        self._plan: list = [True] * self.L  # per layer: True (run), False (skip) or a (Q,) bool tensor
        self._prompt_len: int | None = None
        self._fixed_prompt_len = prompt_len  # training: batches laid out with every prompt ending at one column
        self._call_tmax: int | None = None
        self._step = -1  # T of the current decode step; -1 in the prefill
        self._dynamic = None  # a dynamic policy's object for the current decode step (None otherwise)
        self._routing = None  # a per-token policy's decisions for the current forward (None otherwise)
        self._ran: list[int] = []  # layers (0-based) the dynamic step has run so far
        self._handles: list = []
        self._saved: list = []  # (object, attribute, previous instance value or None)
        self.lossless, self.draft_len = lossless, draft_len  # generate() drafts with the policy, verifies in full
        self.draft_confidence = draft_confidence  # lossless: stop drafting early below this top probability
        self._depth: range | None = None  # lossless mode's prefill and verify forwards: these layers, nothing recorded
        self._edge: int | None = None  # lossless mode: the layer (0-based) whose input state is captured / fed
        self._captured: list | None = None  # (B, 1, C) states entering layer _edge, one per forward, when recording
        self._feed: torch.Tensor | None = None  # (B, Q, C) the state layer _edge takes instead of its input
        if lossless:
            self.stats.lossless = LosslessStats()

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        # Remember any instance attribute we shadow (an outer context's wrapper, an accelerate hook) to restore it.
        for idx, layer in enumerate(self.layers):
            self._saved.append((layer, "forward", layer.__dict__.get("forward")))
            layer.forward = MethodType(self._layer_forward(idx, layer.forward), layer)
        stack = submodule(self.model, self.family.stack)
        self._handles.append(stack.register_forward_pre_hook(self._before_stack, with_kwargs=True))
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
    def _generate(self, *args, **kwargs):
        gen_config = kwargs.get("generation_config") or self.model.generation_config
        self._call_tmax = self.max_new_tokens or kwargs.get("max_new_tokens") or gen_config.max_new_tokens
        if not self._call_tmax:
            raise ValueError("layer_skipping needs max_new_tokens (the policies' Tmax): pass it to either")
        self._prompt_len, self._step = None, -1  # a new call starts with its prompt (prefill)
        self.stats.last_call, self.stats.last_call_rows = [], []
        if self.lossless:
            return self._generate_lossless(args, kwargs)
        use_cache = kwargs.get("use_cache", gen_config.use_cache)
        if use_cache is not False and kwargs.get(self.cache_kw) is None:  # None = generate()'s default: cached
            # Layer 0 may be skipped: give generate() a cache that reports the true length.
            kwargs[self.cache_kw] = SkipCache(config=self.model.config)
        try:
            return self._orig_generate(*args, **kwargs)
        finally:  # a later plain forward in the context is a new prompt, not this call's next token
            self._prompt_len, self._call_tmax, self._step, self._dynamic = None, None, -1, None
            self._routing = None

    def _generate_lossless(self, args, kwargs):
        """generate() in lossless mode (hsd_exp.skip.lossless): the policy drafts, the full model verifies."""
        gen, inputs = effective_config(self.model, dict(kwargs))
        check_lossless(gen, self.draft_len, self.draft_confidence)
        input_ids = args[0] if args else inputs.pop("input_ids")
        try:
            return lossless_generate(self, input_ids, inputs.get("attention_mask"), gen, self.draft_len,
                                     self.stats.lossless, self.draft_confidence)
        finally:
            self._prompt_len, self._call_tmax, self._step, self._dynamic, self._routing = None, None, -1, None, None
            self._edge, self._captured = None, None

    @contextmanager
    def run_layers(self, layers: range | None = None, feed: torch.Tensor | None = None):
        """Forwards inside run exactly ``layers`` (0-based; None: the policy decides) and record nothing; with
        ``feed`` (B, Q, C), layer ``_edge`` takes it as its input state (lossless mode's top-only verification)."""
        saved = self._depth, self._feed
        self._depth, self._feed = layers, feed
        try:
            yield
        finally:
            self._depth, self._feed = saved

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
        if self._fixed_prompt_len is not None:
            self._prompt_len = self._fixed_prompt_len
        elif past == 0 and (cache is not None or self._call_tmax is None or self._prompt_len is None):
            # A new prompt: prefill. Only generate(use_cache=False) feeds one sequence cache-less step after
            # step; outside generate() every cache-less forward is a prompt of its own.
            self._prompt_len = q
        elif self._prompt_len is None:  # past > 0: a cache filled before the engine saw its prompt
            raise ValueError(
                f"layer_skipping got a KV cache already holding {past} positions at the start of a call: the "
                "policies count generated tokens from the end of the prompt (T = position - prompt length), "
                "so generate() inside the context must start from an empty cache (it prefills the prompt); "
                f"pass no {self.cache_kw} (the engine gives generate() a fresh SkipCache)"
            )
        tmax = self._call_tmax or self.max_new_tokens
        steps = [p - self._prompt_len for p in range(past, past + q)]  # T of each query position

        self._dynamic, self._ran, self._routing = None, [], None
        if self._depth is not None:  # lossless mode's prefill and verification: a fixed range of layers
            self._plan = [i in self._depth for i in range(self.L)]
            return None
        if steps[-1] < 0:  # prefill: every layer
            self.stats.prefill_tokens += x.shape[0] * q
            self._plan, self._step = [True] * self.L, -1
            return None
        if tmax is None:
            raise ValueError("layer_skipping needs max_new_tokens when used outside generate()")
        self._step = steps[-1]
        self.stats.decode_rows += x.shape[0]

        if getattr(self.policy, "per_token", False):  # decided per row, position and layer in _layer_forward
            self._plan = [True] * self.L
            self._routing = self.policy.begin_forward(steps, x.device)
            return None
        if not self.policy.static:  # decided layer by layer in _layer_forward
            if q != 1 or cache is None:
                raise ValueError(f"policy '{self.policy.name}' needs cached decoding (use_cache=True), "
                                 "one token per step")
            self._plan = [True] * self.L
            self._dynamic = self.policy.begin_step(self._step, tmax, self.L, self.readout)
            return None

        new_set = self.policy.layers(self._step, tmax, self.L)
        self.stats.record(new_set)
        if q == 1:  # cached decoding: whole layers run or are skipped
            run = set(new_set)
            self._plan = [i in run for i in range(self.L)]
            if cache is not None and len(run) < self.L and not self.lossless:  # lossless: verify needs them
                self._drop_skipped_kv(cache, run)
        else:  # several positions (no-cache reference): per-position (Q,) masks
            sets = {t: set(self.policy.layers(t, tmax, self.L)) for t in set(steps) if t >= 0}
            self._plan = [torch.tensor([t < 0 or i in sets[t] for t in steps], device=x.device)
                          for i in range(self.L)]
        return None

    def _drop_skipped_kv(self, cache, run: set[int]) -> None:
        """Monotone policies never run a skipped layer again: its K/V is dead weight (memory, beam reorders)."""
        if not isinstance(cache, SkipCache):
            raise ValueError(
                "layer skipping with a KV cache needs hsd_exp.skip.engine.SkipCache "
                f"(generate() inside layer_skipping passes one): pass {self.cache_kw}=SkipCache(config=model.config)"
            )
        for i in range(self.L):
            if i not in run and i < len(cache.layers) and cache.layers[i].get_seq_length() > 0:
                cache.layers[i].keys = cache.layers[i].keys[..., :0, :]  # (B, H, 0, D)
                cache.layers[i].values = cache.layers[i].values[..., :0, :]

    # ------------------------------------------------------------------ one decoder layer
    def _layer_forward(self, idx: int, orig_forward):
        engine = self
        signature = inspect.signature(orig_forward)

        def forward(layer, hidden_states, *args, **kwargs):
            if idx == engine._edge:  # lossless mode: the state entering layer E, kept from the drafts or fed back
                if engine._feed is not None:
                    hidden_states = engine._feed
                elif engine._captured is not None:
                    engine._captured.append(hidden_states)
            plan = engine._plan[idx]
            if engine._routing is not None:
                return engine._routed_layer(idx, layer, orig_forward, signature, hidden_states, args, kwargs)
            if engine._dynamic is not None:
                return engine._dynamic_layer(idx, layer, orig_forward, signature, hidden_states, args, kwargs)
            if plan is True:
                return orig_forward(hidden_states, *args, **kwargs)
            if plan is False:
                return hidden_states  # skipped: the residual stream passes through untouched
            out = orig_forward(hidden_states, *args, **kwargs)  # (B, Q, C)
            return torch.where(plan.view(1, -1, 1), out, hidden_states)

        return forward

    def _dynamic_layer(self, idx, layer, orig_forward, signature, h, args, kwargs):
        """One layer during a dynamic policy's decode step (B rows, one query position: h is (B, 1, C))."""
        i = idx + 1  # 1-indexed layer
        if self._dynamic.runs(i):
            out = orig_forward(h, *args, **kwargs)  # (B, 1, C)
            self._ran.append(idx)
            if i < self.L:  # after the last layer there is nothing left to decide
                self._dynamic.after_layer(i, h, out)
        else:  # the state passes through; the layer still writes its K/V from it (CALM's state propagation)
            write_kv_only(layer, self.family, signature, h, args, kwargs)
            out = h
        if i == self.L:
            ran = tuple(self._ran)
            record = self._dynamic.record(ran)
            if record is not None:
                self.stats.calm_exits.append(record)
            self.stats.record(ran, kv_only=self.L - len(ran), evals=self._dynamic.evals)
        return out


    def _routed_layer(self, idx, layer, orig_forward, signature, h, args, kwargs):
        """One layer under a per-token policy: h (B, Q, C); each (row, position) runs or passes h through."""
        routing = self._routing
        run = routing.decide(idx, h)  # (B, Q) bool
        z = routing.gates.get(idx)  # training: the (B, Q) straight-through gate, else None
        ran = int(run.sum())  # one reduction (and one sync on a GPU) per layer
        if ran == 0:  # nobody runs: only the K/V write, so later tokens find the cache complete
            write_kv_only(layer, self.family, signature, h, args, kwargs)
            out = h
        elif z is None and h.shape[1] == 1 and ran < run.numel():  # a batched decode step whose rows differ
            out = run_rows(layer, self.family, signature, h, run[:, 0], args, kwargs)  # MLP for running rows only
        else:
            full = orig_forward(h, *args, **kwargs)  # (B, Q, C); writes K/V from h for every row
            out = full if ran == run.numel() else torch.where(run.unsqueeze(-1), full, h)
            if z is not None:  # training: out = h + z * (layer(h) - h) in value and gradient, skipped tokens too
                out = out + (z - z.detach()).unsqueeze(-1).to(out.dtype) * (full - h)
        if idx == self.L - 1 and self._step >= 0:  # the new token's (last position's) layers, per row
            self.stats.record_rows(routing.counts[:, -1].tolist(), routing.rows_per_layer(), self._step)
        return out


@contextmanager
def layer_skipping(model, policy: Policy, max_new_tokens: int | None = None, prompt_len: int | None = None,
                   lossless: bool = False, draft_len: int = 4, draft_confidence: float | None = None):
    """Apply ``policy`` to every ``model.generate()`` (and forward) inside the block; yields SkipStats.

    ``max_new_tokens`` is the policies' Tmax; when None, each generate() call's own max_new_tokens is used.
    ``prompt_len`` fixes where generated tokens start for plain forwards (skip-aware training batches).
    ``lossless``: the policy drafts ``draft_len`` tokens per round and the full model verifies them, so greedy
    generate() returns exactly plain generate()'s tokens and sampling follows the full model's distribution
    (hsd_exp.skip.lossless; ``stats.lossless`` counts drafts, acceptance and verifications); ``draft_confidence``
    (None = off) ends a round's drafting early once some row's draft has its top probability below it.
    On exit the model is exactly as before (plain ``generate()`` again), even after an exception.
    """
    engine = SkipEngine(model, policy, max_new_tokens, prompt_len, lossless, draft_len, draft_confidence)
    try:
        engine.install()
        yield engine.stats
    finally:
        engine.remove()
