"""The recipe search's recipes_table.py: mean ± spread rows and the acceptance verdicts under both readings of
"spread"."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "experiments" / "finetune_recipe" / "recipes_table.py"


def _runs(out: Path, split: str, name: str, aucs: list[float], tars: list[float]) -> None:
    for seed, (auc, tar) in enumerate(zip(aucs, tars)):
        run = out / split / name / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "test.json").write_text(json.dumps({"auc": auc, "tar@far=1e-2": tar, "rank1": 0.5}))


def test_table_rows_and_acceptance_under_spread_and_std(tmp_path):
    out = tmp_path / "recipes"
    # AUC: gain 0.06 against a range of 0.03 (3 x = 0.09: misses) but a std of 0.015 (3 x = 0.045: beats)
    _runs(out, "A", "recipe", [0.95, 0.95, 0.95], [0.70, 0.71, 0.72])
    _runs(out, "A", "triplet_radam_sf", [0.875, 0.89, 0.905], [0.30, 0.31, 0.32])
    _runs(out, "A", "triplet_adamw_cosine", [0.89, 0.89, 0.89], [0.70, 0.70, 0.70])  # TAR: no gain
    printed = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "recipe", "the recipe", "triplet_radam_sf", "radam"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "| recipe | A | 3 | 0.950 ± 0.000 | 0.710 ± 0.020 | 0.500 ± 0.000 | the recipe |" in printed
    assert "| triplet_radam_sf | A | 3 | 0.890 ± 0.030 |" in printed
    radam = next(line for line in printed.splitlines() if "vs triplet_radam_sf" in line)
    assert "auc +0.060 vs 3 x spread 0.090: does NOT beat, vs 3 x std 0.045: beats" in radam
    assert "tar@far=1e-2 +0.400 vs 3 x spread 0.060: beats, vs 3 x std 0.030: beats" in radam
    adamw = next(line for line in printed.splitlines() if "vs triplet_adamw_cosine" in line)
    assert "tar@far=1e-2 +0.010 vs 3 x spread 0.060: does NOT beat, vs 3 x std 0.030: does NOT beat" in adamw
