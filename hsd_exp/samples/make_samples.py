"""Regenerate the bundled samples from the real data in ``../shared/data`` (dev/CI machines only).

    python hsd_exp/samples/make_samples.py [--src ../shared/data] [--out hsd_exp/samples]

For each dataset and split: walk the rows' groups (E2E: meaning_representation, CommonGen:
concept_set_idx) in order of first appearance and keep whole groups while the row count stays within
the budget (train 1000 rows, test 200 rows). Rows are written grouped (a group's rows together), in
Hub schema, one JSON object per line. Deterministic: same input -> byte-identical output.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = {  # dataset folder -> group key
    "e2e": "meaning_representation",
    "common_gen": "concept_set_idx",
}
BUDGET = {"train": 1000, "test": 200}  # rows per split
LICENCES = {"common_gen": "LICENSE-CommonGen"}  # licence file shipped with the data -> samples/<name>/LICENSE


def sample_rows(rows: list[dict], key: str, budget: int) -> list[dict]:
    """Whole groups, first-appearance order, while the total row count stays <= budget."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    out: list[dict] = []
    for members in groups.values():
        if len(out) + len(members) > budget:
            break
        out.extend(members)
    return out


def main(src: Path, out: Path) -> None:
    for name, key in SAMPLES.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for split, budget in BUDGET.items():
            with open(src / name / f"{split}.jsonl", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            kept = sample_rows(rows, key, budget)
            with open(out / name / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                for row in kept:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"{name}/{split}.jsonl: {len(kept)} rows, {len({r[key] for r in kept})} groups")
        if name in LICENCES and (src / name / LICENCES[name]).is_file():
            shutil.copyfile(src / name / LICENCES[name], out / name / "LICENSE")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    main(args.src, args.out)
