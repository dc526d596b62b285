"""The table of run_recipes.sh (this folder's README): per run and split, mean ± standard deviation over seeds, then
issue 32's acceptance check of the candidate against the article's recipe.

    python launch/experiments/wild_recipe/wild_table.py OUT NAME WHAT [NAME WHAT ...]

Reads OUT/SPLIT/NAME/seedS/test.json (facedist.evaluation.protocol: all-pairs AUC, TAR@FAR=1e-3, rank-1, and
with --pairs the 10-fold accuracy of the split's pairs file).
Acceptance, on each of the splits A and B and for AUC and TAR@FAR=1e-3: the candidate's mean minus the article
recipe's (triplet + AdamW/cosine) mean against 3 x the larger of the two standard deviations over seeds. The
check needs at least 2 seeds of each; the dev splits, where the recipe is chosen, are left out of it.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

# the relit-ORL search's readers and verdict (same folder layout, same wording)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetune_recipe"))
from recipes_table import reports, verdict  # noqa: E402

METRICS = (
    ("auc", "test AUC"),
    ("tar@far=1e-3", "TAR@FAR=1e-3"),
    ("rank1", "rank-1"),
    ("pairs_accuracy", "10-fold accuracy"),
)
CANDIDATE, ARTICLE = "faces_wild", "triplet_adamw_cosine"
MEASURED_SPLITS = ("A", "B")


def mean_std(values: list[float]) -> str:
    """'mean ± std' over seeds (sample standard deviation); the mean alone for one seed."""
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def row(out: Path, split: str, name: str, what: str) -> str | None:
    """One table row, or None when the run has no finished seed on the split."""
    tests = reports(out, split, name)
    if not tests:
        return None
    cells = [mean_std([r[key] for r in tests if r.get(key) is not None]) for key, _ in METRICS]
    return f"| {name} | {split} | {len(tests)} | " + " | ".join(cells) + f" | {what} |"


def acceptance(out: Path, splits: list[str]) -> list[str]:
    """One line per measured split: the candidate against the article's recipe, then the overall verdict."""
    lines, passed = [], []
    for split in [s for s in MEASURED_SPLITS if s in splits]:
        candidate, article = reports(out, split, CANDIDATE), reports(out, split, ARTICLE)
        if len(candidate) < 2 or len(article) < 2:
            lines.append(
                f"- split {split}: needs 2+ seeds of {CANDIDATE} and {ARTICLE} (has {len(candidate)}, {len(article)})"
            )
            passed.append(False)
            continue
        parts = []
        for key in ("auc", "tar@far=1e-3"):
            a, b = [r[key] for r in candidate], [r[key] for r in article]
            gain = statistics.fmean(a) - statistics.fmean(b)
            bound = 3 * max(statistics.stdev(a), statistics.stdev(b))
            parts.append(f"{key} {gain:+.3f} vs 3 x std {bound:.3f}: {verdict(gain, bound)}")
            passed.append(gain > bound)
        lines.append(
            f"- split {split}, {CANDIDATE} ({len(candidate)} seeds) vs {ARTICLE} ({len(article)} seeds): "
            + "; ".join(parts)
        )
    met = len(passed) == 2 * len(MEASURED_SPLITS) and all(passed)
    lines.append(f"Done when (both splits, both metrics): {'met' if met else 'NOT met'}")
    return lines


def main(argv: list[str]) -> int:
    out, pairs = Path(argv[0]), list(zip(argv[1::2], argv[2::2]))
    splits = sorted(p.name for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    titles = [title for _, title in METRICS]
    print("| run | split | seeds | " + " | ".join(titles) + " | what it is |")
    print("|---|---|---|" + "---|" * len(titles) + "---|")
    for name, what in pairs:
        for split in splits:
            line = row(out, split, name, what)
            if line:
                print(line)
    print()
    print("\n".join(acceptance(out, splits)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
