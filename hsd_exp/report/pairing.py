"""Pairing: which Full run each run is measured against (Speedup, % of full), and why a run has none.

A Full run is a baseline for a run of the same setting (``RunRecord.setting``: weights, data, prompt format,
decoding, limit) that scored the same examples (``examples_hash``); anything else would compare other work.
"""

from __future__ import annotations

from pathlib import Path

from hsd_exp.eval.metrics import QUALITY_KEYS
from hsd_exp.report.runs import SETTING_FIELDS, RunRecord, as_text, is_number


def same_examples(a: RunRecord, b: RunRecord) -> bool:
    """Whether two runs scored the same examples, as far as their metrics.json tell: the same
    ``examples_hash`` where both recorded one, else (runs from before it) the same ``num_examples`` where both
    have one. A run that scored nothing yet compares equal (it has no numbers to pair)."""
    if a.examples_hash and b.examples_hash:
        return a.examples_hash == b.examples_hash
    if a.num_examples is not None and b.num_examples is not None:
        return a.num_examples == b.num_examples
    return True


def shown(text: str, width: int = 40) -> str:
    """A setting value on one short line: "-" for none, newlines as \\n, a long instruction cut with "..."."""
    text = text.replace("\r", "\\r").replace("\n", "\\n") or "-"
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def has_quality(run: RunRecord) -> bool:
    return any(is_number(getattr(run, k)) for k in QUALITY_KEYS)


def full_runs(group: list[RunRecord]) -> list[RunRecord]:
    """The full-decoding runs that can be a baseline: those with quality metrics."""
    return [run for run in group if run.is_baseline and has_quality(run)]


def baselines(group: list[RunRecord]) -> dict[Path, RunRecord]:
    """{run.path: its Full run}: a full-decoding run of the same setting (RunRecord.setting) that scored the same
    examples (runs.same_examples); runs without one are left out. Chosen for its quality alone (a Full run
    scored on resume has no tokens/s but is still the % of full reference; only Speedup then stays blank):
    among the matching Full runs with quality metrics, a complete one first, then one with tokens/s."""
    fulls = full_runs(group)
    best: dict[Path, RunRecord] = {}
    for run in group:
        matches = [full for full in fulls if full.setting == run.setting and same_examples(run, full)]
        if matches:
            best[run.path] = max(matches, key=_baseline_rank)  # the first of equal rank, in path order
    return best


def _differences(run: RunRecord, full: RunRecord) -> list[str]:
    """What sets ``run`` apart from a Full run: each SETTING_FIELDS entry that differs, and the examples scored."""
    out = [f"{short} (`{shown(mine)}` here, `{shown(theirs)}` there)"
           for (_, short), mine, theirs in zip(SETTING_FIELDS, run.setting, full.setting, strict=True)
           if mine != theirs]
    if not same_examples(run, full):
        if run.num_examples != full.num_examples:
            out.append(f"examples scored ({as_text(run.num_examples) or '?'} here, "
                       f"{as_text(full.num_examples) or '?'} there)")
        else:
            out.append(f"examples scored (as many, other ones: examples_hash `{run.examples_hash}` here, "
                       f"`{full.examples_hash}` there)")
    return out


def unpaired_notes(runs: list[RunRecord], rows: list[dict], baselines: dict[Path, RunRecord]) -> list[str]:
    """One note per run with numbers but no Full run of its own: why its Speedup and % of full are blank, as
    the differences from the nearest Full run (fewest differences; a complete one with tokens/s first)."""
    fulls = full_runs(runs)
    method = {str(row["path"]): row["method"] for row in rows}
    notes = []
    for run in runs:
        if run.path in baselines or not fulls or not (has_quality(run) or is_number(run.tokens_per_s)):
            continue
        nearest = min(fulls, key=lambda f: (len(_differences(run, f)), tuple(not x for x in _baseline_rank(f))))
        name = method.get(str(run.path), run.method)
        notes.append(f"{name}: no Full run of its setting, so no Speedup or % of full; the nearest Full run "
                     f"(`{nearest.path}`) differs in {', '.join(_differences(run, nearest))}.")
    return notes


def _baseline_rank(run: RunRecord) -> tuple[bool, bool]:
    return (run.complete, is_number(run.tokens_per_s))
