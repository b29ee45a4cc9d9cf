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

Each runner (prefill, plain, every policy) is called ``bench.repeats`` times, the runners interleaved, and
summarised by ``bench.statistic``: ``min`` by default (interference from other processes only adds time),
``median`` as the alternative.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig

import hsd_exp  # noqa: F401  (registers ${hsd_root:})
from hsd_exp.data.loaders import load_examples
from hsd_exp.data.prompts import build_prompt
from hsd_exp.decoding import DecodeSettings
from hsd_exp.errors import ConfigError, exit_on_config_error
from hsd_exp.flops import call_flops, decode_flops, lossless_decode_flops, prefill_flops
from hsd_exp.models.shipped import adapter_router
from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.lossless import LosslessSettings
from hsd_exp.skip.policies import Policy, build_policy


def prompts_for(lm, batch_size: int) -> list[str]:
    """Realistic prompts: the bundled E2E sample in the model's prompt format."""
    cfg = OmegaConf.load(Path(hsd_exp.ROOT) / "conf" / "dataset" / "e2e.yaml")
    cfg.path = "sample"
    examples = load_examples(cfg, split="test", limit=max(batch_size, 1))
    return [build_prompt(ex.source, cfg, lm.tokenizer, lm.chat) for ex in examples[:batch_size]]


STATISTICS = {"min": min, "median": statistics.median}


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_setting(lm, policies, batch_size: int, beams: int, new_tokens: int, repeats: int,
                  statistic: str = "min", progress: Callable[[str], None] | None = None) -> list[dict]:
    """One (batch size, beam width): every runner timed ``repeats`` times, interleaved, summarised by
    ``statistic``. ``min`` (the default, as ``timeit`` advises) is the least disturbed call: on a shared
    machine other processes only ever add time, and they add it to runners unevenly.

    ``progress(label)`` is called after each call (warm-ups included: ``calls_per_setting``), outside the timed
    part."""
    progress = progress or (lambda label: None)
    agg = STATISTICS[statistic]
    model, tok = lm.model, lm.tokenizer
    enc = tok(prompts_for(lm, batch_size), return_tensors="pt", padding=True,
              add_special_tokens=not lm.chat).to(model.device)
    decode = exact_length(new_tokens, beams, batch_size)
    gen = decode.generation_config(tok)
    prompt_len, rows = enc["input_ids"].shape[1], batch_size * beams

    def plain():
        with torch.no_grad():
            plain.out = model.generate(**enc, generation_config=gen)

    one = exact_length(1, beams, batch_size).generation_config(tok)

    def prefill_only():  # the prompt pass and the first token: the same under every policy
        with torch.no_grad():
            return model.generate(**enc, generation_config=one)

    def under(row):  # a policy, or a Lossless row: the same decoding, its policy drafting for the full model
        lossless = row.settings if isinstance(row, Lossless) else None
        policy = row.policy if isinstance(row, Lossless) else row

        def fn():
            with layer_skipping(model, policy, max_new_tokens=decode.max_new_tokens, lossless=lossless) as stats, \
                    torch.no_grad():
                fn.out = model.generate(**enc, generation_config=gen)
            fn.stats = stats
        return fn

    runners = [("prefill", None, prefill_only), ("plain generate()", None, plain)]
    runners += [(p.label, p, under(p)) for p in policies]
    for label, _, fn in runners:  # warm-up (allocator, kernels) and the stats of each policy
        fn()
        progress(label)
    times = {label: [] for label, _, _ in runners}
    for _ in range(repeats):  # interleaved: every repeat times each runner once
        for label, _, fn in runners:
            times[label].append(time_call(fn))
            progress(label)
    t_prefill = agg(times["prefill"])
    base = agg(times["plain generate()"])
    call_plain = call_flops(model, prompt_len, rows, new_tokens, None)
    decode_plain = decode_flops(model, prompt_len, rows, new_tokens, None)
    out = []
    for label, policy, fn in runners[1:]:
        t = agg(times[label])
        stats = getattr(fn, "stats", None)
        if isinstance(policy, Lossless):  # drafts and verifications, not one decode step per token
            decode = lossless_decode_flops(model, prompt_len, rows, new_tokens, stats)
            ideal = call_plain / (prefill_flops(model, prompt_len, rows) + decode)
            decode_ideal = decode_plain / decode
        else:
            ideal = call_plain / call_flops(model, prompt_len, rows, new_tokens, stats) if stats else 1.0
            decode_ideal = decode_plain / decode_flops(model, prompt_len, rows, new_tokens, stats) if stats else 1.0
        extra = {}
        if stats is not None and stats.lossless is not None:
            extra = {"acceptance": stats.lossless.acceptance,
                     "tokens_per_verification": stats.lossless.tokens_per_verification,
                     "verify_avg_layers": stats.lossless.verify_avg_layers,
                     "identical": bool(torch.equal(fn.out, plain.out))}  # the promise: plain generate()'s tokens
        measured = base / t
        # The decode steps alone: the prefill's time taken off both (None if noise makes it meaningless).
        decode_measured = (base - t_prefill) / (t - t_prefill) if t > t_prefill and base > t_prefill else None
        out.append({"model": lm.name, "batch_size": batch_size, "num_beams": beams, "policy": label,
                    "avg_layers": stats.avg_layers if stats else float(lm.num_layers),
                    "tokens_per_s": batch_size * new_tokens / t, "seconds": t, "prefill_seconds": t_prefill,
                    "measured_speedup": measured, "ideal_speedup": ideal, "efficiency": measured / ideal,
                    "decode_measured_speedup": decode_measured, "decode_ideal_speedup": decode_ideal,
                    "decode_efficiency": None if decode_measured is None else decode_measured / decode_ideal,
                    "prompt_len": prompt_len, "new_tokens": new_tokens, **extra})
    return out


def exact_length(new_tokens: int, beams: int, batch_size: int) -> DecodeSettings:
    """The benchmark's decoding: greedy (or ``beams``-wide beam search), every row exactly ``new_tokens`` tokens
    (EOS suppressed until then), so every runner does the same work."""
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, do_sample=False)
    return DecodeSettings(gen, batch_size)


@dataclass(frozen=True)
class Lossless:
    """A benchmark row in lossless mode: ``policy`` drafts ``draft_len`` tokens, the full model verifies."""

    policy: Policy
    draft_len: int = LosslessSettings.draft_len
    draft_confidence: float | None = LosslessSettings.draft_confidence  # None: always draft_len tokens
    settings: LosslessSettings = field(init=False, repr=False, compare=False)

    def __post_init__(self):  # LosslessSettings checks both values
        object.__setattr__(self, "settings", LosslessSettings(self.draft_len, self.draft_confidence))

    @property
    def label(self) -> str:
        conf = f",c={self.draft_confidence:g}" if self.draft_confidence is not None else ""
        return f"{self.policy.label} lossless(k={self.draft_len}{conf})"

    @property
    def objects(self) -> tuple[str, ...]:
        return self.policy.objects


def bench_policy(entry: dict, depth: int | None) -> Policy | Lossless:
    """One ``bench.policies`` entry: a policy's parameters, plus ``lossless: true`` (and ``draft_len``) for a
    lossless row that drafts with it."""
    lossless = entry.pop("lossless", False)
    settings = {k: entry.pop(k) for k in ("draft_len", "draft_confidence") if k in entry}
    policy = build_policy(num_layers=depth, **entry)
    return Lossless(policy, **settings) if lossless else policy


def with_router(row: Policy | Lossless, router) -> Policy | Lossless:
    if "router" not in row.objects:
        return row
    if isinstance(row, Lossless):
        return Lossless(row.policy.with_router(router), row.draft_len, row.draft_confidence)
    return row.with_router(router)


def check_router_source(router: str | None, adapter: str | None, policies) -> Path | None:
    """The router directory SkipLayer rows use: ``bench.router``, else ``<bench.adapter>/router``. Checked before
    the model loads; a SkipLayer row without one is refused."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"bench.adapter={adapter} holds no LoRA adapter (adapter_config.json): pass a LoRA "
                          "run's <run>/hf_model")
    if router is None:  # the router saved beside the adapter (the one lookup tasks use for model.adapter)
        router = adapter_router(adapter)
    if not any("router" in p.objects for p in policies):
        return None
    if router is None:
        raise ConfigError("bench.policies has a skiplayer row but no router: set bench.router=<run>/hf_model/router "
                          "(or bench.adapter=<run>/hf_model, whose router/ it then uses)")
    if not (Path(router) / "router.json").is_file():
        raise ConfigError(f"bench.router={router} holds no router (router.json + router.safetensors): pass "
                          "<run>/hf_model/router of a run trained with finetune.router=true")
    return Path(router)


def calls_per_setting(num_policies: int, repeats: int) -> int:
    """generate() calls ``bench_setting`` makes: prefill, plain and each policy, once to warm up + ``repeats``."""
    return (num_policies + 2) * (repeats + 1)


HEAD = ("| model | batch | beams | policy | Avg. Layer | tokens/s | measured speedup | ideal speedup "
        "| measured/ideal | decode: measured | decode: ideal | decode: measured/ideal | acceptance | identical |")


def render(rows: list[dict], head: bool = True) -> str:
    lines = [HEAD, "|" + "---|" * 14] if head else []
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['num_beams']} | {r['policy']} | {r['avg_layers']:.2f} "
                     f"| {r['tokens_per_s']:.1f} | {r['measured_speedup']:.3f} | {r['ideal_speedup']:.3f} "
                     f"| {r['efficiency']:.3f} | {_fmt(r['decode_measured_speedup'])} "
                     f"| {r['decode_ideal_speedup']:.3f} | {_fmt(r['decode_efficiency'])} "
                     f"| {_fmt(r.get('acceptance'))} | {r.get('identical', '')} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
    print(render([]), flush=True)  # the table once: its head now, each setting's rows as they are measured
    with progress_bar(len(settings) * calls_per_setting(len(policies), int(b.repeats)), "bench", "calls") as advance:
        for i, (batch_size, beams) in enumerate(settings, 1):
            where = f"batch {batch_size} x beams {beams} ({i}/{len(settings)})"
            new = bench_setting(lm, policies, batch_size, beams, int(b.max_new_tokens), int(b.repeats), statistic,
                                progress=lambda label, where=where: advance(f"{where}: {label}"))
            rows += new
            print(render(new, head=False), flush=True)
    out = Path(cfg.paths.output_dir)
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    (out / "bench.md").write_text(render(rows) + "\n")
    print(f"\nwritten: {out / 'bench.md'}")


if __name__ == "__main__":
    main()
