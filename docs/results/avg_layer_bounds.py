"""Bounds on the true Avg. Layer of run folders written before the 2026-11-26 fix of ``layers_per_token``.

Before the fix a row that ended before the longest row of its batch also counted the decode step that fed
its last token back (``per_step[:n]`` instead of ``per_step[:n - 1]``). The records let us undo that for every
row but those whose length ties the batch's longest record: such a row had either that many tokens (one
entry too many) or one more (none). Batches are rebuilt from the file order and ``decode.batch_size``.

    python docs/results/avg_layer_bounds.py outputs/study/*/*/ > docs/results/avg_layer_bounds.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def bounds(run: Path) -> tuple[float, float, int, int]:
    """(true Avg. Layer if every tied row had one entry too many, ... if none had, tied rows, rows)."""
    batch_size = int(yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["decode"]["batch_size"])
    records = [json.loads(line)["layers_per_token"] for line in (run / "predictions.jsonl").open() if line.strip()]
    drop, keep, tied_rows = [], [], 0
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        longest = max(len(r) for r in batch)
        tied = sum(len(r) == longest for r in batch)
        for r in batch:
            if len(r) < longest:  # ended before the longest row: one entry too many, for sure
                drop += r[:-1]
                keep += r[:-1]
            elif tied == 1:  # the longest row itself: counted right
                drop += r
                keep += r
            else:  # tied with the longest: either
                tied_rows += 1
                drop += r[:-1]
                keep += r
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(drop), mean(keep), tied_rows, len(records)


def main(dirs: list[str]) -> None:
    print("| run | policy | recorded Avg. Layer | true Avg. Layer lies in | rows tied with their batch's longest |")
    print("|---|---|---:|---:|---:|")
    for d in dirs:
        run = Path(d)
        if not (run / "metrics.json").is_file() or not (run / "predictions.jsonl").is_file():
            continue
        m = json.loads((run / "metrics.json").read_text())
        a, b, tied, n = bounds(run)
        lo, hi = min(a, b), max(a, b)
        print(f"| {run.parent.name}/{run.name} | {m.get('policy_label')} | {m['avg_layers']:.2f} | "
              f"{lo:.2f}-{hi:.2f} | {tied}/{n} |")


if __name__ == "__main__":
    main(sys.argv[1:])
