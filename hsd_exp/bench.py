"""Speed benchmark: ``python -m hsd_exp.bench model=smollm2-135m bench.batch_sizes=[1,8]``.

For each (batch size, beam width) it times, in one process and interleaved (so drift hits all alike),
plain ``generate()`` and ``generate()`` under each policy, every row producing exactly ``max_new_tokens``
tokens. It prints tokens/s, the measured speedup over plain generate, and the ideal speedup from FLOPs:

    FLOPs(call) = prefill + sum over decode steps T of  R * [ sum_{i in run(T)} (2 * P_i + 4 * ctx_T * d)
                                                             + 2 * d * V ]
    ideal speedup = FLOPs(plain) / FLOPs(policy),   efficiency = measured / ideal

with P_i the parameters of decoder layer i, R = batch x beams rows, ctx_T the attended length, d the
hidden size, V the vocabulary (LM head). The prefill runs every layer in both and is counted the same.
Embedding lookups are gathers (no multiply-adds) and count 0; norms are negligible. CALM adds, per token,
its confidence checks (an LM head each for ``softmax``; counted as one for ``state`` too, an upper bound)
and the attention blocks of the layers above the exit, which still write K/V.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig

import hsd_exp  # noqa: F401  (registers ${hsd_root:})
from hsd_exp.data import load_examples
from hsd_exp.errors import ConfigError
from hsd_exp.families import decoder_layers, family_of
from hsd_exp.policies import build_policy
from hsd_exp.prompts import build_prompt
from hsd_exp.skipping import SkipStats, layer_skipping


def layer_flops(model) -> tuple[list[int], list[int], int, int]:
    """(2 * params of each decoder layer, 2 * params of its attention block, hidden size d, vocabulary V)."""
    text = model.config.get_text_config()
    attn = family_of(model).attn
    layers = decoder_layers(model)
    per_layer = [2 * sum(p.numel() for p in layer.parameters()) for layer in layers]
    per_attn = [2 * sum(p.numel() for p in getattr(layer, attn).parameters()) for layer in layers]
    return per_layer, per_attn, text.hidden_size, text.vocab_size


def call_flops(model, prompt_len: int, rows: int, new_tokens: int, stats: SkipStats | None) -> float:
    """FLOPs of one generate() call; ``stats`` None = plain generate (every layer every step)."""
    per_layer, per_attn, d, vocab = layer_flops(model)
    L = len(per_layer)
    prefill = rows * sum(f + 4 * prompt_len * d for f in per_layer) + rows * 2 * d * vocab
    total = prefill
    for t in range(new_tokens - 1):  # decode steps process generated tokens 0..new_tokens-2
        ctx = prompt_len + t + 1
        run = range(L) if stats is None else stats.step_layers[t]
        step = sum(per_layer[i] + 4 * ctx * d for i in run) + 2 * d * vocab
        if stats is not None and stats.kv_only[t]:  # CALM: the top layers' attention writes K/V (propagation)
            step += sum(per_attn[i] + 4 * ctx * d for i in range(L - stats.kv_only[t], L))
        if stats is not None:  # CALM: one LM-head (softmax) or cosine per confidence check
            step += stats.confidence_evals[t] * 2 * d * vocab
        total += rows * step
    return float(total)


def prompts_for(lm, batch_size: int) -> list[str]:
    """Realistic prompts: the bundled E2E sample in the model's prompt format."""
    cfg = OmegaConf.load(Path(hsd_exp.ROOT) / "conf" / "dataset" / "e2e.yaml")
    cfg.path = "sample"
    examples = load_examples(cfg, split="test", limit=max(batch_size, 1))
    return [build_prompt(ex.source, cfg, lm.tokenizer, lm.chat) for ex in examples[:batch_size]]


def time_call(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_setting(lm, policies, batch_size: int, beams: int, new_tokens: int, repeats: int) -> list[dict]:
    model, tok = lm.model, lm.tokenizer
    enc = tok(prompts_for(lm, batch_size), return_tensors="pt", padding=True,
              add_special_tokens=not lm.chat).to(model.device)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams,
                           do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompt_len, rows = enc["input_ids"].shape[1], batch_size * beams

    def plain():
        with torch.no_grad():
            return model.generate(**enc, generation_config=gen)

    def under(policy):
        def fn():
            with layer_skipping(model, policy, max_new_tokens=new_tokens) as stats, torch.no_grad():
                model.generate(**enc, generation_config=gen)
            fn.stats = stats
        return fn

    runners = [("plain generate()", None, plain)] + [(p.label, p, under(p)) for p in policies]
    for _, _, fn in runners:  # warm-up (allocator, kernels) and the stats of each policy
        fn()
    times = {label: [] for label, _, _ in runners}
    for _ in range(repeats):  # interleaved: every repeat times each runner once
        for label, _, fn in runners:
            times[label].append(time_call(fn, 1))
    flops_plain = call_flops(model, prompt_len, rows, new_tokens, None)
    base = statistics.median(times["plain generate()"])
    out = []
    for label, _, fn in runners:
        t = statistics.median(times[label])
        stats = getattr(fn, "stats", None)
        ideal = flops_plain / call_flops(model, prompt_len, rows, new_tokens, stats) if stats else 1.0
        measured = base / t
        out.append({"model": lm.name, "batch_size": batch_size, "num_beams": beams, "policy": label,
                    "avg_layers": stats.avg_layers if stats else float(lm.num_layers),
                    "tokens_per_s": batch_size * new_tokens / t, "seconds": t, "measured_speedup": measured,
                    "ideal_speedup": ideal, "efficiency": measured / ideal, "prompt_len": prompt_len,
                    "new_tokens": new_tokens})
    return out


def render(rows: list[dict]) -> str:
    head = "| model | batch | beams | policy | Avg. Layer | tokens/s | measured speedup | ideal speedup | measured/ideal |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['num_beams']} | {r['policy']} | {r['avg_layers']:.2f} "
                     f"| {r['tokens_per_s']:.1f} | {r['measured_speedup']:.3f} | {r['ideal_speedup']:.3f} "
                     f"| {r['efficiency']:.3f} |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    from hsd_exp.tasks import build

    try:
        b = cfg.bench
        policies = [build_policy(num_layers=cfg.model.get("num_layers"), **p) for p in b.policies]
        if b.threads:
            torch.set_num_threads(int(b.threads))
        lm = build(cfg.model)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    rows = []
    for batch_size in b.batch_sizes:
        for beams in b.num_beams:
            rows += bench_setting(lm, policies, int(batch_size), int(beams), int(b.max_new_tokens), int(b.repeats))
            print(render([r for r in rows if r["batch_size"] == batch_size and r["num_beams"] == beams]), flush=True)
    out = Path(cfg.paths.output_dir)
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    (out / "bench.md").write_text(render(rows) + "\n")
    print(f"\n{render(rows)}\n\nwritten: {out / 'bench.md'}")


if __name__ == "__main__":
    main()
