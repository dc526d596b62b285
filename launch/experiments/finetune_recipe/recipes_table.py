"""The tables of compare_recipes.sh (this folder's README): per run and split, mean and spread over seeds, then
the acceptance check of the recipe against its two baselines, the article's recipes (triplet loss with
RAdamScheduleFree, and with AdamW + cosine).

    python launch/experiments/finetune_recipe/recipes_table.py OUT NAME WHAT [NAME WHAT ...]

Reads OUT/SPLIT/NAME/seedS/test.json (facedist.evaluation.protocol); a run that also has test_noflip.json
(the same weights embedded without flip test-time augmentation) gets a row for that too, before its own.
Spread = max - min over the seeds. Acceptance, per split and metric (AUC, TAR@FAR=1e-2): the recipe's mean
minus each baseline's mean, against 3 x the larger of the two spreads, and against 3 x the larger of the
two standard deviations over seeds (the other reading of "seed-to-seed spread"; for 3 seeds max - min is
about 1.7 standard deviations).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METRICS = (("auc", "test AUC"), ("tar@far=1e-2", "TAR@FAR=1e-2"), ("rank1", "rank-1"))
BASELINES, RECIPE = ("triplet_radam_sf", "triplet_adamw_cosine"), "recipe"


def cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {max(values) - min(values):.3f}"


def reports(out: Path, split: str, name: str, file: str = "test.json") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / split / name).glob(f"seed*/{file}"))]


def verdict(gain: float, bound: float) -> str:
    return "beats" if gain > bound else "does NOT beat"


def acceptance(out: Path, splits: list[str]) -> list[str]:
    lines = []
    for split in splits:
        recipe = reports(out, split, RECIPE)
        for baseline_name in BASELINES:
            baseline = reports(out, split, baseline_name)
            if len(recipe) < 2 or len(baseline) < 2:
                continue
            parts = []
            for key in ("auc", "tar@far=1e-2"):
                a, b = [r[key] for r in recipe], [r[key] for r in baseline]
                gain = sum(a) / len(a) - sum(b) / len(b)
                spread = 3 * max(max(a) - min(a), max(b) - min(b))
                std = 3 * max(statistics.stdev(a), statistics.stdev(b))
                parts.append(
                    f"{key} {gain:+.3f} vs 3 x spread {spread:.3f}: {verdict(gain, spread)}, "
                    f"vs 3 x std {std:.3f}: {verdict(gain, std)}"
                )
            lines.append(
                f"- split {split}, recipe ({len(recipe)} seeds) vs {baseline_name} ({len(baseline)} seeds): "
                + "; ".join(parts)
            )
    return lines


def main(argv: list[str]) -> int:
    out, pairs = Path(argv[0]), list(zip(argv[1::2], argv[2::2]))
    splits = sorted(p.name for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    print("| run | split | seeds | " + " | ".join(title for _, title in METRICS) + " | what it is |")
    print("|---|---|---|" + "---|" * len(METRICS) + "---|")
    for name, what in pairs:
        for split in splits:
            for file, label, about in (
                (
                    "test_noflip.json",
                    f"{name}, no flip TTA",
                    f"{name}'s weights embedded without flip TTA (= {name} minus eval.flip)",
                ),
                ("test.json", name, what),
            ):
                found = reports(out, split, name, file)
                if found:
                    cells = [cell([r[key] for r in found if r[key] is not None]) for key, _ in METRICS]
                    print(f"| {label} | {split} | {len(found)} | " + " | ".join(cells) + f" | {about} |")
    print()
    print("\n".join(acceptance(out, [s for s in splits if not s.startswith("dev")])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
