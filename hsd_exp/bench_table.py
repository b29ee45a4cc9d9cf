"""What the benchmark writes (hsd_exp.bench): ``bench.md`` (the table it prints), ``bench.csv`` (one row per table
row, snake_case columns, for generated docs tables) and the flag on a row measured above its bound.

A row's speedups are held to its decode-step bound B = ``decode_ideal_speedup`` (static policies: the FLOP ratio
of the decode steps; lossless rows: the pass-count bound, ``hsd_exp.flops.lossless_bound_flops``). The whole call
adds the same prefill P to both sides, so its speedup (P + D_plain) / (P + D_row) lies between 1 and B: its bound
is max(1, B). A row above its bound by more than ``NOISE`` (5%) is flagged "above ideal: noise or bug", never
printed plain: no correct measurement can beat the work it skipped.
"""

from __future__ import annotations

import csv
import io

NOISE = 0.05  # relative: more than repeated timings of the same call differ on a quiet machine
ABOVE_IDEAL = "above ideal: noise or bug"


def above_ideal(row: dict) -> bool:
    """The row's call speedup beats max(1, B), or its decode speedup beats B, by more than NOISE."""
    bound = row["decode_ideal_speedup"]
    call = row["measured_speedup"] > max(1.0, bound) * (1 + NOISE)
    decode = row["decode_measured_speedup"] is not None and row["decode_measured_speedup"] > bound * (1 + NOISE)
    return call or decode


HEAD = ("| model | adapter | batch | beams | decode | length | policy | Avg. Layer | tokens | tokens/s "
        "| measured speedup | decode: measured | decode: ideal | decode: measured/ideal | acceptance | identical "
        "| note |")


def render(rows: list[dict], head: bool = True) -> str:
    lines = [HEAD, "|" + "---|" * HEAD.count(" | ") + "---|"] if head else []
    for r in rows:
        lines.append(f"| {r['model']} | {r['adapter'] or '-'} | {r['batch_size']} | {r['num_beams']} | {r['decode']} "
                     f"| {r['length']} | {r['policy']} | {r['avg_layers']:.2f} | {r['tokens']} "
                     f"| {r['tokens_per_s']:.1f} | {r['measured_speedup']:.3f} | {_fmt(r['decode_measured_speedup'])} "
                     f"| {r['decode_ideal_speedup']:.3f} | {_fmt(r['decode_efficiency'])} "
                     f"| {_fmt(r.get('acceptance'))} | {r.get('identical', '')} | {r['note']} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


CSV_COLUMNS = ("model", "adapter", "prompt_chat", "prompt_format", "dtype", "batch_size", "num_beams", "decode",
               "length", "policy", "avg_layers", "tokens", "tokens_per_s", "seconds", "prefill_seconds",
               "measured_speedup", "ideal_speedup", "decode_measured_speedup", "decode_ideal_speedup",
               "decode_efficiency", "flop_ratio", "decode_flop_ratio", "plain_spread", "acceptance",
               "tokens_per_verification", "verify_avg_layers", "identical", "above_ideal", "prompt_len",
               "new_tokens")


def to_csv(rows: list[dict]) -> str:
    """bench.csv: ``CSV_COLUMNS``, one line per table row (empty where a row has no such value)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS} for r in rows)
    return out.getvalue()


__all__ = ["ABOVE_IDEAL", "CSV_COLUMNS", "HEAD", "NOISE", "above_ideal", "render", "to_csv"]
