"""The aligners comparison's helper: scores on the photos both aligners found (common_photos.py)."""

import json
import sys
from pathlib import Path

import numpy as np

from facedist.evaluation.protocol import score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch" / "experiments" / "aligners"))
import common_photos  # noqa: E402


def _npz(path: Path, photos: list[tuple[str, str]], vectors: np.ndarray) -> None:
    np.savez(
        path,
        embeddings=vectors.astype(np.float32),
        identity=np.array([identity for identity, _ in photos]),
        path=np.array([f"/x/{identity}/{name}" for identity, name in photos]),
    )


def test_each_run_is_scored_on_the_photos_both_found(tmp_path, monkeypatch, capsys):
    photos = [(f"id{i}", f"{j:06d}.jpg") for i in range(4) for j in range(3)]
    rng = np.random.default_rng(0)
    yunet = rng.normal(size=(len(photos), 8))
    haar_photos = [p for k, p in enumerate(photos) if k not in (1, 7)]  # Haar missed two photos
    haar = rng.normal(size=(len(haar_photos), 8))
    _npz(tmp_path / "yunet.npz", photos, yunet)
    _npz(tmp_path / "haar.npz", [(i, n.replace(".jpg", ".png")) for i, n in haar_photos], haar)  # same stem
    monkeypatch.setattr(sys, "argv", ["common_photos.py", str(tmp_path / "yunet.npz"), str(tmp_path / "haar.npz")])
    common_photos.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["photos"], line["common"]) for line in lines] == [(12, 10), (10, 10)]
    kept = [k for k in range(len(photos)) if k not in (1, 7)]
    expected = score(
        yunet[kept].astype(np.float32),
        np.array([p[0] for p in haar_photos]),
        np.array([f"/x/{i}/{n}" for i, n in haar_photos]),
    )
    assert lines[0]["auc"] == expected["auc"] and lines[0]["images"] == 10
