"""The README table of launch/compare_recipes.sh: per run and split, mean and spread over seeds.

    python launch/recipes_table.py OUT NAME OVERRIDES [NAME OVERRIDES ...]

Reads OUT/SPLIT/NAME/seedS/test.json (facedist.evaluation.protocol). Spread = max - min over the seeds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = (("auc", "test AUC"), ("tar@far=1e-2", "TAR@FAR=1e-2"), ("rank1", "rank-1"))


def cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {max(values) - min(values):.3f}"


def main(argv: list[str]) -> int:
    out, pairs = Path(argv[0]), list(zip(argv[1::2], argv[2::2]))
    splits = sorted(p.name for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    print("| run | split | seeds | " + " | ".join(title for _, title in METRICS) + " | overrides of configs/faces_finetune.yaml |")
    print("|---|---|---|" + "---|" * len(METRICS) + "---|")
    for name, overrides in pairs:
        for split in splits:
            reports = [json.loads(p.read_text()) for p in sorted((out / split / name).glob("seed*/test.json"))]
            if not reports:
                continue
            cells = [cell([r[key] for r in reports if r[key] is not None]) for key, _ in METRICS]
            print(f"| {name} | {split} | {len(reports)} | " + " | ".join(cells) + f" | `{' '.join(overrides.split()) or '(the recipe)'}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
