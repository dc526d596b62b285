"""The recipe search's relit_breakdown.py: relit-ORL genuine pairs split into one photo under two lights and two
photos."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "experiments" / "finetune_recipe" / "relit_breakdown.py"
spec = importlib.util.spec_from_file_location("relit_breakdown", SCRIPT)
relit_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(relit_breakdown)


def _embeddings(path: Path, paths: list[str], vectors: np.ndarray) -> Path:
    identities = np.array([p.split("/")[0] for p in paths])
    np.savez(path, embeddings=vectors.astype(np.float32), identity=identities, path=np.array(paths))
    return path


def test_lighting_pairs_and_photo_pairs_are_scored_apart(tmp_path, capsys):
    """Each photo has one direction, its lights small perturbations of it; a person's two photos point 60
    degrees apart and other people elsewhere: lighting pairs are all accepted, photo pairs less so."""
    rng = np.random.default_rng(0)
    paths, vectors = [], []
    for person in range(6):
        base = rng.normal(size=16)
        other = base + np.linalg.norm(base) * np.tan(np.radians(60)) * rng.normal(size=16) / 4
        for photo, direction in ((1, base), (2, other)):
            for light in range(4):
                paths.append(f"s{person + 1:02d}/{photo:02d}_{light}.png")
                vectors.append(direction / np.linalg.norm(direction) + 0.01 * rng.normal(size=16))
    assert relit_breakdown.main([str(_embeddings(tmp_path / "e.npz", paths, np.array(vectors)))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["same_photo"]["pairs"] == 6 * 2 * 6 and report["other_photo"]["pairs"] == 6 * 16
    assert report["impostor_pairs"] == 48 * 47 // 2 - 6 * (12 + 16)
    assert report["same_photo"]["auc"] == 1.0 and report["same_photo"]["tar@far=1e-02"] == 1.0
    assert report["other_photo"]["auc"] < report["same_photo"]["auc"]


def test_a_folder_without_relit_names_is_one_line(tmp_path):
    paths = [f"s0{i}/photo{j}.png" for i in (1, 2) for j in (1, 2)]  # every image its own photo
    with pytest.raises(SystemExit) as err:
        relit_breakdown.main([str(_embeddings(tmp_path / "plain.npz", paths, np.eye(4)))])
    message = str(err.value.code)
    assert "plain.npz: no genuine pairs of same photo" in message and "\n" not in message
