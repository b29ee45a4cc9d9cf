"""Speed benchmark: ``python -m hsd_exp.bench model=smollm2-135m bench.batch_sizes=[1,8]``.

For each (batch size, beam width) it times, in one process and interleaved (so drift hits all alike),
plain ``generate()`` and ``generate()`` under each policy, every row producing exactly ``max_new_tokens``
tokens. It prints tokens/s, the measured speedup over plain generate, and the ideal speedup from FLOPs:

    prefill     = R * [ sum_i (Pr * 2 * P_i + 2 * Pr * (Pr + 1) * d) + 2 * d * V ]
    decode      = sum over decode steps T of  R * [ sum_{i in run(T)} (2 * P_i + 4 * ctx_T * d) + 2 * d * V ]
    FLOPs(call) = prefill + decode
    ideal speedup = FLOPs(plain) / FLOPs(policy),   efficiency = measured / ideal

with P_i the parameters of decoder layer i, R = batch x beams rows, Pr the (padded) prompt length, ctx_T
the attended length, d the hidden size, V the vocabulary (LM head; at prefill only the last position's
logits are computed). Attention costs 4 * ctx * d per query position and layer (Q.K and A.V); a causal
prompt position p attends to p + 1 positions. Embedding lookups are gathers (no multiply-adds) and count 0;
norms are negligible. CALM adds, per token, its confidence checks (an LM head each for ``softmax``; counted
as one for ``state`` too, an upper bound) and the attention blocks of the layers above the exit, which
still write K/V. The FLOP model itself is hsd_exp.flops.

The prefill runs every layer under every policy, and on a CPU it runs at far more FLOPs per second than
the one-token decode steps do, so whole-call FLOPs understate what skipping saves in time. The benchmark
therefore also times the prefill alone (plain ``generate()`` with one new token) and reports the decode
steps on their own: measured = (t_plain - t_prefill) / (t_policy - t_prefill) against the ideal
decode(plain) / decode(policy). That pair is where "skipped layers cost nothing" shows.

Lossless rows are held to a bound, not a FLOP count: each verify forward costs at least a one-position forward
(its weights are read once whatever its k + 1 positions), hsd_exp.flops.lossless_bound_flops. A row measured above
its bound by more than 5% is flagged "above ideal: noise or bug" (hsd_exp.bench_table).

Each runner (prefill, plain, every policy) is called ``bench.repeats`` times, the runners interleaved, and
summarised by ``bench.statistic``: ``min`` by default (interference from other processes only adds time),
``median`` as the alternative. Repeat r starts at runner r (mod their number): in a fixed order plain generate()
always ran right after the 1-token prefill call and each policy after the same neighbour, a bias no repeat count
averages out.

Prompts are built as the timed weights were trained (hsd_exp.bench_prompts: an adapter's own run config or
shipped preset). Lossless rows are also run at natural length (EOS allowed, rows stop; ``bench.natural``), beside
plain generate() at natural length: their acceptance on real answers, not on 64 forced tokens. The run folder gets
bench.md, bench.json and bench.csv (hsd_exp.bench_table).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from transformers import GenerationConfig

import hsd_exp  # noqa: F401  (registers ${hsd_root:})
from hsd_exp.atomic import write_atomic
from hsd_exp.bench_prompts import PromptFormat, prompt_format, prompts_for
from hsd_exp.bench_rows import (  # noqa: F401  (re-exported)
    Lossless,
    bench_adapter,
    bench_policy,
    check_router_source,
    overrides_key,
    with_router,
)
from hsd_exp.bench_table import ABOVE_IDEAL, HEAD, above_ideal, render, to_csv  # noqa: F401  (HEAD: re-exported)
from hsd_exp.data.prompts import prompt_special_tokens
from hsd_exp.decoding import DecodeSettings
from hsd_exp.errors import ConfigError, exit_on_config_error
from hsd_exp.flops import call_flops, decode_flops, lossless_bound_flops, lossless_decode_flops, prefill_flops
from hsd_exp.skip.engine import layer_skipping

STATISTICS = {"min": min, "median": statistics.median}
PLAIN = "plain generate()"


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def exact_length(new_tokens: int, beams: int, batch_size: int) -> DecodeSettings:
    """The benchmark's decoding: greedy (or ``beams``-wide beam search), every row exactly ``new_tokens`` tokens
    (EOS suppressed until then), so every runner does the same work."""
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, do_sample=False)
    return DecodeSettings(gen, batch_size)


def natural_length(new_tokens: int, batch_size: int) -> DecodeSettings:
    """Greedy decoding that stops at EOS (at most ``new_tokens``): the answers the model really writes."""
    return DecodeSettings(GenerationConfig(max_new_tokens=new_tokens, do_sample=False), batch_size)


def row_tokens(out: torch.Tensor, prompt_len: int, eos: int | list[int] | None) -> int:
    """Tokens the rows of ``out`` (B, Pr + N) really generated: each row up to and including its first EOS."""
    new = out[:, prompt_len:]  # (B, N)
    if eos is None or new.shape[1] == 0:
        return int(new.numel())
    ends = torch.isin(new, torch.tensor(eos if isinstance(eos, list) else [eos], device=new.device))  # (B, N)
    first = torch.where(ends.any(1), ends.int().argmax(1) + 1, torch.full_like(ends[:, 0], new.shape[1], dtype=torch.long))
    return int(first.sum())


@dataclass
class Runner:
    """One timed generate() call: plain (``row`` None) or under a policy / Lossless row, at one length."""

    label: str
    row: object
    length: str  # "fixed" (every row new_tokens tokens) or "natural" (EOS allowed)
    fn: Callable[[], None]

    @property
    def key(self) -> tuple[str, str]:
        return self.label, self.length


def calls_per_setting(num_policies: int, repeats: int, natural_rows: int = 0) -> int:
    """generate() calls ``bench_setting`` makes: prefill, plain and each policy (plus, with ``natural_rows``
    lossless rows at natural length, plain and each of them again), once to warm up + ``repeats``."""
    natural = natural_rows + 1 if natural_rows else 0
    return (num_policies + 2 + natural) * (repeats + 1)


def natural_rows(policies, beams: int, natural: bool) -> int:
    """Lossless rows that also run at natural length (greedy only: lossless mode refuses beams)."""
    return sum(isinstance(p, Lossless) for p in policies) if natural and beams == 1 else 0


def bench_setting(lm, policies, batch_size: int, beams: int, new_tokens: int, repeats: int,
                  statistic: str = "min", progress: Callable[[str], None] | None = None,
                  fmt: PromptFormat | None = None, adapter: str | None = None, natural: bool = True) -> list[dict]:
    """One (batch size, beam width): every runner timed ``repeats`` times, interleaved (repeat r starting at
    runner r), summarised by ``statistic``. ``min`` (the default, as ``timeit`` advises) is the least disturbed
    call: on a shared machine other processes only ever add time, and they add it to runners unevenly.

    ``fmt``: the prompt format (default: the model's ``chat`` on E2E); ``adapter``: the merged adapter's name, for
    the rows. ``progress(label)`` is called after each call (warm-ups included: ``calls_per_setting``), outside
    the timed part."""
    progress = progress or (lambda label: None)
    agg = STATISTICS[statistic]
    model, tok = lm.model, lm.tokenizer
    fmt = fmt or prompt_format(lm.chat, None, False)
    enc = tok(prompts_for(fmt, tok, batch_size), return_tensors="pt", padding=True,
              add_special_tokens=prompt_special_tokens(fmt.chat)).to(model.device)
    gens = {"fixed": exact_length(new_tokens, beams, batch_size).generation_config(tok),
            "natural": natural_length(new_tokens, batch_size).generation_config(tok)}
    prompt_len, rows = enc["input_ids"].shape[1], batch_size * beams
    one = exact_length(1, beams, batch_size).generation_config(tok)

    def prefill_only():  # the prompt pass and the first token: the same under every policy
        with torch.no_grad():
            return model.generate(**enc, generation_config=one)

    def under(row, length):  # plain (row None), a policy, or a Lossless row (its policy drafts for the full model)
        lossless = row.settings if isinstance(row, Lossless) else None
        policy = row.policy if isinstance(row, Lossless) else row

        def fn():
            if row is None:
                with torch.no_grad():
                    fn.out = model.generate(**enc, generation_config=gens[length])
                return
            with layer_skipping(model, policy, max_new_tokens=new_tokens, lossless=lossless) as stats, \
                    torch.no_grad():
                fn.out = model.generate(**enc, generation_config=gens[length])
            fn.stats = stats
        return fn

    runners = [Runner("prefill", None, "fixed", prefill_only), Runner(PLAIN, None, "fixed", under(None, "fixed"))]
    runners += [Runner(p.label, p, "fixed", under(p, "fixed")) for p in policies]
    if natural_rows(policies, beams, natural):
        runners += [Runner(PLAIN, None, "natural", under(None, "natural"))]
        runners += [Runner(p.label, p, "natural", under(p, "natural")) for p in policies if isinstance(p, Lossless)]

    def tick(r):
        progress(r.label if r.length == "fixed" else f"{r.label} (natural length)")

    for r in runners:  # warm-up (allocator, kernels) and the stats of each policy
        r.fn()
        tick(r)
    times = {r.key: [] for r in runners}
    for i in range(repeats):  # interleaved, each repeat starting one runner later: no runner keeps one neighbour
        start = i % len(runners)
        for r in runners[start:] + runners[:start]:
            times[r.key].append(time_call(r.fn))
            tick(r)
    t_prefill = agg(times["prefill", "fixed"])
    out = []
    for r in runners[1:]:
        plain = next(p for p in runners if p.row is None and p.label == PLAIN and p.length == r.length)
        out.append(_row(lm, model, r, plain, times, agg, t_prefill, prompt_len, rows, batch_size, beams,
                        new_tokens, fmt, adapter))
    return out


def _row(lm, model, r: Runner, plain: Runner, times, agg, t_prefill, prompt_len, rows, batch_size, beams,
         new_tokens, fmt, adapter) -> dict:
    """One table row: speedups against plain generate() at the same length, held to the row's bound."""
    t, base = agg(times[r.key]), agg(times[plain.key])
    steps = plain.fn.out.shape[1] - prompt_len  # tokens the batch ran (natural: until its last row stopped)
    call_plain, decode_plain = (call_flops(model, prompt_len, rows, steps, None),
                                decode_flops(model, prompt_len, rows, steps, None))
    stats = getattr(r.fn, "stats", None)
    extra = {}
    if isinstance(r.row, Lossless):  # drafts and verifications, not one decode step per token
        bound = lossless_bound_flops(model, prompt_len, rows, steps, stats)
        flops = lossless_decode_flops(model, prompt_len, rows, steps, stats)
        prefill = prefill_flops(model, prompt_len, rows)
        ideal, decode_ideal = call_plain / (prefill + bound), decode_plain / bound
        extra = {"flop_ratio": call_plain / (prefill + flops), "decode_flop_ratio": decode_plain / flops,
                 "acceptance": stats.lossless.acceptance,
                 "tokens_per_verification": stats.lossless.tokens_per_verification,
                 "verify_avg_layers": stats.lossless.verify_avg_layers,
                 "identical": bool(torch.equal(r.fn.out, plain.fn.out))}  # the promise: plain generate()'s tokens
    elif stats is not None:
        ideal = call_plain / call_flops(model, prompt_len, rows, steps, stats)
        decode_ideal = decode_plain / decode_flops(model, prompt_len, rows, steps, stats)
    else:
        ideal = decode_ideal = 1.0
    measured = base / t
    # The decode steps alone: the prefill's time taken off both (None if noise makes it meaningless).
    decode_measured = (base - t_prefill) / (t - t_prefill) if t > t_prefill and base > t_prefill else None
    tokens = batch_size * new_tokens if r.length == "fixed" else row_tokens(
        r.fn.out, prompt_len, lm.tokenizer.eos_token_id)  # the EOS generate() stopped at (DecodeSettings)
    plain_times = times[plain.key]
    row = {"model": lm.name, "adapter": adapter or "", "prompt_chat": fmt.chat, "prompt_format": fmt.origin,
           "dtype": str(model.dtype).removeprefix("torch."), "batch_size": batch_size, "num_beams": beams,
           "decode": "lossless" if isinstance(r.row, Lossless) else ("greedy" if beams == 1 else "beam"),
           "length": r.length, "policy": r.label,
           "avg_layers": stats.avg_layers if stats else float(lm.num_layers), "tokens": tokens,
           "tokens_per_s": tokens / t, "seconds": t, "prefill_seconds": t_prefill,
           "measured_speedup": measured, "ideal_speedup": ideal, "efficiency": measured / ideal,
           "decode_measured_speedup": decode_measured, "decode_ideal_speedup": decode_ideal,
           "decode_efficiency": None if decode_measured is None else decode_measured / decode_ideal,
           "plain_spread": max(plain_times) / min(plain_times) - 1,  # how much plain's own repeats differ
           "prompt_len": prompt_len, "new_tokens": steps, **extra}
    row["above_ideal"] = above_ideal(row)
    row["note"] = ABOVE_IDEAL if row["above_ideal"] else ""
    return row


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    from hsd_exp.console import progress_bar, quiet_libraries
    from hsd_exp.models.shipped import merge_adapter
    from hsd_exp.run_settings import build, model_depth

    quiet_libraries(HydraConfig.get().verbose)
    with exit_on_config_error():
        b = cfg.bench
        statistic = b.get("statistic", "min")
        if statistic not in STATISTICS:
            raise ConfigError(f"bench.statistic={statistic!r} is not one of {sorted(STATISTICS)}; "
                              f"set bench.statistic=min or bench.statistic=median")
        depth = model_depth(cfg.model)  # model.path: its own config.json's depth, family checked first
        policies = [bench_policy(dict(p), depth) for p in b.policies]
        router_dir = check_router_source(b.get("router"), b.get("adapter"), policies)
        adapter = bench_adapter(b.get("adapter"), cfg.model.get("adapter"))
        fmt = prompt_format(cfg.model.get("chat", False), adapter, overrides_key(HydraConfig.get(), "model.chat"))
        natural = bool(b.get("natural", True))
        if b.threads:
            torch.set_num_threads(int(b.threads))
        lm = build(cfg.model, **({"num_layers": depth} if cfg.model.get("path") else {}))
        if b.get("adapter"):  # a LoRA run's hf_model: merged, so it costs what the base model costs
            lm.model = merge_adapter(lm.model, b.adapter).eval()
        if router_dir is not None:
            from hsd_exp.skip.router import SkipRouter

            router = SkipRouter.load(router_dir, lm.model).eval()
            policies = [with_router(p, router) for p in policies]
    settings = [(int(batch), int(beams)) for batch in b.batch_sizes for beams in b.num_beams]
    rows = []
    calls = sum(calls_per_setting(len(policies), int(b.repeats), natural_rows(policies, beams, natural))
                for _, beams in settings)
    print(f"prompts: {'chat template' if fmt.chat else 'source + separator'} on the {fmt.dataset_name} sample "
          f"(from {fmt.origin})", flush=True)
    print(render([]), flush=True)  # the table once: its head now, each setting's rows as they are measured
    with progress_bar(calls, "bench", "calls") as advance:
        for i, (batch_size, beams) in enumerate(settings, 1):
            where = f"batch {batch_size} x beams {beams} ({i}/{len(settings)})"
            new = bench_setting(lm, policies, batch_size, beams, int(b.max_new_tokens), int(b.repeats), statistic,
                                progress=lambda label, where=where: advance(f"{where}: {label}"), fmt=fmt,
                                adapter=adapter, natural=natural)
            rows += new
            print(render(new, head=False), flush=True)
    out = Path(cfg.paths.output_dir)
    write_atomic(out / "bench.json", json.dumps(rows, indent=2))
    write_atomic(out / "bench.md", render(rows) + "\n")
    write_atomic(out / "bench.csv", to_csv(rows))
    print(f"\nwritten: {out / 'bench.md'}, bench.csv, bench.json")


if __name__ == "__main__":
    main()
