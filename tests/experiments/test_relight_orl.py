"""The recipe search's relight_orl.py: deterministic relit copies of ORL-style folders, lit from the side."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "experiments" / "finetune_recipe" / "relight_orl.py"


def _orl(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for identity in (1, 2):
        (root / f"s{identity}").mkdir(parents=True)
        for photo in (1, 2):
            Image.fromarray(rng.integers(90, 200, (112, 92), dtype=np.uint8)).save(
                root / f"s{identity}" / f"{photo}.pgm"
            )
    (root / "README").write_text("not an identity")
    return root


def _relight(orl, out, *extra):
    subprocess.run(
        [sys.executable, str(SCRIPT), str(orl), str(out), "--variants", "3", *extra], check=True, capture_output=True
    )
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_relit_faces_are_deterministic_and_strongly_shaded(tmp_path):
    orl = _orl(tmp_path / "orl")
    first = _relight(orl, tmp_path / "a")
    assert sorted(first) == [f"s0{i}/0{p}_{v}.png" for i in (1, 2) for p in (1, 2) for v in range(3)]
    assert _relight(orl, tmp_path / "b") == first  # same arguments, same bytes
    assert _relight(orl, tmp_path / "c", "--seed", "1") != first
    sidedness = []
    for name in first:
        image = np.asarray(Image.open(tmp_path / "a" / name), dtype=np.float64)
        assert image.shape == (112, 92)
        left, right = image[20:90, 10:40].mean(), image[20:90, 52:82].mean()
        sidedness.append(abs(left - right) / max(left, right, 1.0))
    assert np.mean(sidedness) > 0.2 and max(sidedness) > 0.5  # lit from the side: one half much darker


def test_light_ranges_are_options(tmp_path):
    """--azimuth / --elevation / --ambient set the ranges the lights are drawn from: a light straight ahead
    lights both halves alike; lights from far behind the side (and no ambient) leave the faces darker."""
    orl = _orl(tmp_path / "orl")
    frontal = _relight(orl, tmp_path / "front", "--azimuth", "0", "--elevation", "0", "0")
    harsh = _relight(orl, tmp_path / "harsh", "--azimuth", "110", "--elevation", "-35", "70", "--ambient", "0", "0")

    def halves(root, name):
        image = np.asarray(Image.open(root / name), dtype=np.float64)
        return image[20:90, 10:40].mean(), image[20:90, 52:82].mean()

    for name in frontal:
        left, right = halves(tmp_path / "front", name)
        assert abs(left - right) / max(left, right) < 0.1
    mean = lambda root, names: np.mean([np.asarray(Image.open(root / n), dtype=np.float64).mean() for n in names])
    assert mean(tmp_path / "harsh", harsh) < 0.8 * mean(tmp_path / "front", frontal)
