"""A row's Speedup over its Full run, and the flags that say when a number should not be believed as it stands.

    Speedup = ms_per_step(Full) / ms_per_step(run)          one decode step of the batch, prefill timed apart
    Speedup = tokens_per_s(run) / tokens_per_s(Full)         lossless rows: wall time per generated token

Time per decode step is what output length cannot move: tokens/s counts tokens up to each row's EOS, so a policy
writing long garbage (every row busy while Full pads its finished rows) reads fast at a longer wall time. Lossless
decoding has no steps (it runs rounds), but its output is Full's, so per-token wall time compares like with like.
A run without per-step timing (metrics.json from before it was recorded) gets no Speedup: tokens/s would be the
number this module exists to replace.

Flags (the Flags column; a note under the table explains each):
    length      mean_new_tokens(run) / mean_new_tokens(Full) outside [LENGTH_LOW, LENGTH_HIGH]: other work than Full
    > ideal     Speedup > flop_ideal * IDEAL_NOISE: faster than the FLOPs of its layers allow, so the timing is off
"""

from __future__ import annotations

from hsd_exp.report.runs import RunRecord, is_number

LENGTH_LOW, LENGTH_HIGH = 0.67, 1.5  # output length vs Full's, per example, within which a row does Full's work
IDEAL_NOISE = 1.10  # a measured speedup this far above its FLOP ideal is more than timing noise
STEP, TOKEN = "ms/step", "tokens/s"  # the two measures (report.csv's speedup_by)


def _ratio(a, b) -> float | None:
    return a / b if is_number(a) and is_number(b) and b else None


def speedup(run: RunRecord, full: RunRecord | None) -> tuple[float | None, str | None]:
    """(Speedup, its measure) against ``full``; (None, None) without a Full run or the numbers it needs."""
    if full is None:
        return None, None
    if run.batch_size is not None and full.batch_size is not None and run.batch_size != full.batch_size:
        return None, None  # a batch's step (and a token's share of it) costs what its batch size makes it cost
    if run.lossless:
        value = _ratio(run.tokens_per_s, full.tokens_per_s)
        return value, TOKEN if value is not None else None
    value = _ratio(full.ms_per_step, run.ms_per_step)
    return value, STEP if value is not None else None


def length_ratio(run: RunRecord, full: RunRecord | None) -> float | None:
    """mean_new_tokens(run) / mean_new_tokens(Full): how much longer (> 1) or shorter its outputs are."""
    return _ratio(run.mean_new_tokens, full.mean_new_tokens) if full is not None else None


def flags(run: RunRecord, length: float | None, value: float | None) -> list[str]:
    """The row's flags: its output length against Full's, its Speedup against its FLOP ideal."""
    out = []
    if length is not None and not LENGTH_LOW <= length <= LENGTH_HIGH:
        out.append(f"length x{length:.2f} of Full")
    if is_number(value) and is_number(run.flop_ideal) and value > run.flop_ideal * IDEAL_NOISE:
        out.append(f"Speedup > FLOP ideal {run.flop_ideal:.2f}")
    return out


def speed_notes(rows: list[dict], runs_without_timing: list[str]) -> list[str]:
    """The notes under a table that explain its Speedup column and its flags (only those that occur)."""
    notes = []
    if any(row["speedup_by"] == STEP for row in rows):
        notes.append("Speedup = ms/step(Full) / ms/step(run): the time of one decode step of the batch, the prefill "
                     "timed apart, which output length cannot move (tokens/s counts tokens up to EOS: a run that "
                     "writes longer outputs reads faster; it is shown, not used).")
    lossless = [row["method"] for row in rows if row["speedup_by"] == TOKEN]
    if lossless:
        notes.append(f"Speedup by wall time per generated token, tokens/s(run) / tokens/s(Full), for "
                     f"{', '.join(lossless)}: lossless decoding runs rounds, not steps, and its output is Full's, "
                     f"so the lengths match.")
    if runs_without_timing:
        notes.append(f"No per-step timing (ms_per_step) in these runs' or their Full run's metrics.json (evaluated "
                     f"before it was recorded), so no Speedup: {', '.join(runs_without_timing)}.")
    long = [f"{row['method']} (x{row['length_ratio']:.2f})" for row in rows if "length x" in (row["flags"] or "")]
    if long:
        notes.append(f"**Flag `length`: outputs average a length outside [{LENGTH_LOW}, {LENGTH_HIGH}] x their Full "
                     f"run's (tokens per example, up to EOS): {', '.join(long)}. They did other work than Full: read "
                     f"their quality and speed with that in mind.**")
    above = [row["method"] for row in rows if "FLOP ideal" in (row["flags"] or "")]
    if above:
        notes.append(f"**Flag `Speedup > FLOP ideal`: measured faster than the FLOPs of the layers it ran allow "
                     f"(FLOP ideal x {IDEAL_NOISE:.2f}): {', '.join(above)}. The timing is off (runs sharing cores, a "
                     f"cold Full run): rerun alone before quoting it.**")
    return notes
