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
CALM decides per token: after each layer it measures confidence and, once confident, the layers above only
write their K/V from the exited state (state propagation) so the cache stays complete.

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache`` (of ``generate()``, the
model forwards and the layers); the engine reads the name off the model's ``forward`` signature, so both work.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hsd_exp.families import decoder_layers, family_of, submodule, unwrap
from hsd_exp.skip.policies import CALM, Policy


def cache_argument(model) -> str:
    """generate()'s (and the forwards') cache argument: "cache" from transformers 5.24 on, "past_key_values"
    before. Read off the model class's ``forward``: instance hooks (accelerate) may wrap the bound one."""
    return "cache" if "cache" in inspect.signature(type(unwrap(model)).forward).parameters else "past_key_values"


class SkipCache(DynamicCache):
    """A DynamicCache whose length is the longest layer's: layer 0 may be skipped and stay short."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((layer.get_seq_length() for layer in self.layers), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # (kv_length, kv_offset)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()


@dataclass
class CalmExit:
    """CALM's decision for one generated token: the confidences seen and where it exited (1-indexed)."""

    step: int
    exit_layer: int
    confidences: list[float]  # min over rows, for layers first_exit..exit_layer
    thresholds: list[float]


@dataclass
class SkipStats:
    """What the engine ran, per processed generated token (decode step), prefill excluded.

    ``avg_layers`` = mean of ``per_step``: the paper's "Avg. Layer". For CALM a step's count is its exit layer
    e (layers 1..e, the exit layer included). The layers above the exit do not count, yet they are not free:
    each still runs its attention block (its norm, the Q/K/V/O projections and attention over the context)
    on the propagated state so as to write K/V, and their number is ``kv_only``. ``hsd_exp.bench``'s FLOP
    model adds that cost (2 * attention-block parameters + 4 * ctx * d per such layer and row) and one LM
    head per confidence check (``confidence_evals``; for ``state`` too, an upper bound); Avg. Layer leaves
    both out.
    CALM in a batch (and across beams) takes one exit per step for all rows, when the least confident row is
    confident; rows already finished (padding after their EOS) still take part in that minimum.
    """

    num_layers: int
    per_step: list[int] = field(default_factory=list)  # layers run per processed generated token
    step_layers: list[tuple[int, ...]] = field(default_factory=list)  # which (0-based), same order
    kv_only: list[int] = field(default_factory=list)  # CALM: layers that only wrote K/V, per token
    confidence_evals: list[int] = field(default_factory=list)  # CALM: confidence computations, per token
    calm_exits: list[CalmExit] = field(default_factory=list)
    last_call: list[int] = field(default_factory=list)  # per_step of the most recent generate() call
    prefill_tokens: int = 0  # prompt positions processed with every layer (B * prompt length, summed)
    decode_rows: int = 0  # rows (batch x beams) per decode step, summed over steps

    @property
    def avg_layers(self) -> float:
        """Mean layers per decode step; NaN when no decode step ran (max_new_tokens=1: prefill only)."""
        return sum(self.per_step) / len(self.per_step) if self.per_step else float("nan")


class SkipEngine:
    """Installs the wrappers; see the module docstring. Use through ``layer_skipping``."""

    def __init__(self, model, policy: Policy, max_new_tokens: int | None = None, prompt_len: int | None = None):
        self.model = unwrap(model)
        self.family = family_of(self.model)
        self.layers = decoder_layers(self.model)
        self.L = len(self.layers)
        policy.check_num_layers(self.L)
        self.policy = policy
        self.max_new_tokens = max_new_tokens
        self.stats = SkipStats(num_layers=self.L)
        self.cache_kw = cache_argument(self.model)
        self.final_norm = submodule(self.model, self.family.final_norm)
        self.lm_head = submodule(self.model, self.family.lm_head)
        self._plan: list = [True] * self.L  # per layer: True (run), False (skip) or a (Q,) bool tensor
        self._prompt_len: int | None = None
        self._fixed_prompt_len = prompt_len  # training: batches laid out with every prompt ending at one column
        self._call_tmax: int | None = None
        self._step = -1
        self._exited = False
        self._calm_trace: list[tuple[float, float]] = []
        self._handles: list = []
        self._saved: list = []  # (object, attribute, previous instance value or None)

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
        self.stats.last_call = []
        use_cache = kwargs.get("use_cache", gen_config.use_cache)
        if use_cache is not False and kwargs.get(self.cache_kw) is None:  # None = generate()'s default: cached
            # Layer 0 may be skipped: give generate() a cache that reports the true length.
            kwargs[self.cache_kw] = SkipCache(config=self.model.config)
        try:
            return self._orig_generate(*args, **kwargs)
        finally:  # a later plain forward in the context is a new prompt, not this call's next token
            self._prompt_len, self._call_tmax, self._step = None, None, -1

    # ------------------------------------------------------------------ before the layers: make the plan
    def _before_stack(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        q = x.shape[1]  # query positions in this forward
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

        self._exited, self._calm_trace = False, []
        if steps[-1] < 0:  # prefill: every layer (and no CALM exits: _step < 0)
            self.stats.prefill_tokens += x.shape[0] * q
            self._plan, self._step = [True] * self.L, -1
            return None
        if tmax is None:
            raise ValueError("layer_skipping needs max_new_tokens when used outside generate()")
        self._step = steps[-1]
        self.stats.decode_rows += x.shape[0]

        if not self.policy.static:  # CALM: decided layer by layer in _layer_forward
            if q != 1 or cache is None:
                raise ValueError("policy 'calm' needs cached decoding (use_cache=True), one token per step")
            self._plan = [True] * self.L
            return None

        new_set = self.policy.layers(self._step, tmax, self.L)
        self._record(new_set, kv_only=0, evals=0)
        if q == 1:  # cached decoding: whole layers run or are skipped
            run = set(new_set)
            self._plan = [i in run for i in range(self.L)]
            if cache is not None and len(run) < self.L:
                if not isinstance(cache, SkipCache):
                    raise ValueError(
                        "layer skipping with a KV cache needs hsd_exp.skip.engine.SkipCache "
                        f"(generate() inside layer_skipping passes one): pass {self.cache_kw}=SkipCache(config=model.config)"
                    )
                for i in range(self.L):  # monotone: a skipped layer never runs again, so drop its K/V
                    if i not in run and i < len(cache.layers) and cache.layers[i].get_seq_length() > 0:
                        cache.layers[i].keys = cache.layers[i].keys[..., :0, :]
                        cache.layers[i].values = cache.layers[i].values[..., :0, :]
        else:  # several positions (no-cache reference): per-position masks
            sets = {t: set(self.policy.layers(t, tmax, self.L)) for t in set(steps) if t >= 0}
            device = x.device
            self._plan = [
                torch.tensor([t < 0 or i in sets[t] for t in steps], device=device) for i in range(self.L)
            ]
        return None

    def _record(self, layer_set: tuple[int, ...], kv_only: int, evals: int) -> None:
        self.stats.per_step.append(len(layer_set))
        self.stats.step_layers.append(tuple(layer_set))
        self.stats.kv_only.append(kv_only)
        self.stats.confidence_evals.append(evals)
        self.stats.last_call.append(len(layer_set))

    # ------------------------------------------------------------------ one decoder layer
    def _layer_forward(self, idx: int, orig_forward):
        engine = self
        signature = inspect.signature(orig_forward)

        def forward(layer, hidden_states, *args, **kwargs):
            plan = engine._plan[idx]
            if isinstance(engine.policy, CALM) and engine._step >= 0 and plan is True:
                return engine._calm_layer(idx, layer, orig_forward, signature, hidden_states, args, kwargs)
            if plan is True:
                return orig_forward(hidden_states, *args, **kwargs)
            if plan is False:
                return hidden_states  # skipped: the residual stream passes through untouched
            out = orig_forward(hidden_states, *args, **kwargs)  # (B, Q, C)
            return torch.where(plan.view(1, -1, 1), out, hidden_states)

        return forward

    def _calm_layer(self, idx, layer, orig_forward, signature, h, args, kwargs):
        """One layer under CALM during a decode step (B rows, one query position)."""
        policy: CALM = self.policy
        if self._exited:  # state propagation: K/V from the exited hidden state, output unchanged
            self._write_kv(layer, signature, h, args, kwargs)
            return h
        out = orig_forward(h, *args, **kwargs)  # (B, 1, C)
        i = idx + 1  # 1-indexed layer
        if i < policy.first_exit or i == self.L:
            if i == self.L:
                self._finish_calm(exit_layer=self.L)
            return out
        if policy.criterion == "softmax":
            probs = F.softmax(self.lm_head(self.final_norm(out[:, -1])).float(), dim=-1)  # (B, V)
            top2 = probs.topk(2, dim=-1).values
            conf = top2[:, 0] - top2[:, 1]  # (B,)
        else:
            conf = F.cosine_similarity(out[:, -1].float(), h[:, -1].float(), dim=-1)  # (B,)
        lam = policy.threshold(i, self._step, self._call_tmax or self.max_new_tokens)
        least = conf.min().item()  # t5x: the batch exits when its least confident row is confident
        self._calm_trace.append((least, lam))
        if least >= lam:
            self._exited = True
            self._finish_calm(exit_layer=i)
        return out

    def _finish_calm(self, exit_layer: int) -> None:
        conf = [c for c, _ in self._calm_trace]
        lam = [t for _, t in self._calm_trace]
        self.stats.calm_exits.append(CalmExit(self._step, exit_layer, conf, lam))
        self._record(tuple(range(exit_layer)), kv_only=self.L - exit_layer, evals=len(conf))

    def _write_kv(self, layer, signature, h, args, kwargs) -> None:
        """Run the layer's attention block on norm(h) only for its side effect: the K/V write."""
        bound = signature.bind(h, *args, **kwargs).arguments
        extra = bound.pop(next(n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), {})
        attn_kwargs = {k: bound[k] for k in ("cache", "past_key_values", "attention_mask", "position_ids",
                                             "position_embeddings", "use_cache") if k in bound}
        attn = getattr(layer, self.family.attn)
        norm = getattr(layer, self.family.attn_norm)
        attn(norm(h), **attn_kwargs, **extra)


@contextmanager
def layer_skipping(model, policy: Policy, max_new_tokens: int | None = None, prompt_len: int | None = None):
    """Apply ``policy`` to every ``model.generate()`` (and forward) inside the block; yields SkipStats.

    ``max_new_tokens`` is the policies' Tmax; when None, each generate() call's own max_new_tokens is used.
    ``prompt_len`` fixes where generated tokens start for plain forwards (skip-aware training batches).
    On exit the model is exactly as before (plain ``generate()`` again), even after an exception.
    """
    engine = SkipEngine(model, policy, max_new_tokens, prompt_len)
    try:
        engine.install()
        yield engine.stats
    finally:
        engine.remove()
