import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import save_tiny_model

from facedist.evaluation.cli import main

ORL = Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny model at the synthetic shards' 32 px."""
    return save_tiny_model(tmp_path_factory.mktemp("run32"), image_size=32)


def _lfw_tree(root: Path, people: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in people.items():
        (root / name).mkdir(parents=True)
        for k in range(1, count + 1):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{name}_{k:04d}.png")
    return root


def _one_line_exit(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value.code)
    assert "\n" not in message and err.value.code != 0
    return message


def _assert_report(out: Path, checkpoint_dir: Path, tsne: bool = False):
    metrics = json.loads((out / "metrics.json").read_text())
    for plot in ("roc.png", "pr.png"):
        assert (out / plot).stat().st_size > 0
    assert any("hist" in p.name for p in out.glob("*.png"))
    assert any("tsne" in p.name for p in out.glob("*.png")) == tsne
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((out / "tensorboard").rglob("projector_config.pbtxt"))
    thresholds = json.loads((checkpoint_dir / "thresholds.json").read_text())
    assert thresholds["far"], "no resolvable FAR threshold stored"
    for far, threshold in thresholds["far"].items():
        assert -1.0 <= threshold <= 1.0 and float(far) > 0
    return metrics, thresholds


@pytest.mark.integration
def test_eval_folder_end_to_end(tiny32, synth_tree, tmp_path):
    _, _, file = tiny32
    out = tmp_path / "report"
    main(
        [
            "--checkpoint",
            str(file.parents[2]),
            "--folder",
            str(synth_tree),
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--cpu",
        ]
    )
    metrics, thresholds = _assert_report(out, file.parent)
    assert thresholds["far"] == {k: v for k, v in metrics["thresholds_at_far"].items() if v is not None}
    assert thresholds["flip"] is False and str(synth_tree) in thresholds["source"]


@pytest.mark.integration
def test_eval_shards_and_image_size_mismatch(tiny32, synth_shards, tmp_path, capsys):
    _, _, file = tiny32
    main(
        [
            "--checkpoint",
            str(file),
            "--shards",
            str(synth_shards),
            "--split",
            "val",
            "--out",
            str(tmp_path / "r"),
            "--num-workers",
            "0",
            "--flip",
            "--cpu",
        ]
    )
    _assert_report(tmp_path / "r", file.parent)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    summary = [line for line in capsys.readouterr().out.splitlines() if "AUC" in line]  # as --bin prints one
    assert len(summary) == 1 and f"AUC {metrics['auc']:.4f}, EER {metrics['eer']:.4f}, TAR@FAR" in summary[0]
    _, _, file64 = save_tiny_model(tmp_path / "run64", image_size=64)
    # other-size shards are resized as training resizes them (tests/test_dataset.py), with one warning line
    main(
        [
            "--checkpoint",
            str(file64),
            "--shards",
            str(synth_shards),
            "--split",
            "val",
            "--out",
            str(tmp_path / "r64"),
            "--num-workers",
            "0",
            "--cpu",
        ]
    )
    _assert_report(tmp_path / "r64", file64.parent)
    warning = [line for line in capsys.readouterr().err.splitlines() if "resized" in line]
    assert len(warning) == 1 and "32x32" in warning[0] and "64x64" in warning[0]


def test_eval_folder_with_junk_evaluates_the_rest_and_lists_it(tiny32, synth_tree, tmp_path, capsys):
    _, _, file = tiny32
    tree = tmp_path / "tree"
    shutil.copytree(synth_tree, tree)
    first, second = sorted(tree.iterdir())[:2]
    (first / "notes.jpg").write_bytes(b"not an image")
    Image.new("RGB", (2, 3)).save(second / "dot.png")
    main(["--checkpoint", str(file), "--folder", str(tree), "--out", str(tmp_path / "o"), "--num-workers", "0"])
    metrics, _ = _assert_report(tmp_path / "o", file.parent)
    assert metrics["num_images"] == 96
    report = json.loads((tmp_path / "o" / "skipped.json").read_text())
    assert [(Path(e["path"]).name, e["reason"].split(" (")[0]) for e in report["skipped"]] == [
        ("notes.jpg", "not an image"),
        ("dot.png", "image is 2x3 px, below the 16 px minimum"),
    ]
    out = capsys.readouterr().out
    assert "96 images embedded, 2 images skipped" in out and "object at 0x" not in out


@pytest.mark.integration
def test_eval_pairs_end_to_end_prints_the_pairs_accuracy(tiny32, tmp_path, capsys):
    _, _, file = tiny32
    root = _lfw_tree(tmp_path / "lfw", {f"P{k}": 4 for k in range(6)})
    lines = [f"P{k} 1 {j}" for k in range(6) for j in (2, 3, 4)]
    lines += [f"P{k} {i} P{(k + 1) % 6} {i}" for k in range(6) for i in (1, 2, 3)]
    (tmp_path / "pairs.txt").write_text("\n".join(["1 18"] + lines) + "\n")
    out = tmp_path / "report"
    main(
        [
            "--checkpoint",
            str(file),
            "--pairs",
            str(tmp_path / "pairs.txt"),
            "--folder",
            str(root),
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--cpu",
        ]
    )
    metrics, _ = _assert_report(out, file.parent)
    assert metrics["pairs"]["source"] == "given pairs" and metrics["pairs"]["num_pairs"] == 36
    accuracy = metrics["accuracy_kfold"]
    summary = next(line for line in capsys.readouterr().out.splitlines() if "AUC" in line)
    assert f": accuracy {accuracy['mean']:.4f} +- {accuracy['std']:.4f} (36 pairs, 10 folds in pair order); " in summary


def test_eval_bad_inputs_are_one_line(tiny32, synth_tree, tmp_path):
    _, _, file = tiny32
    tree = tmp_path / "tree"
    shutil.copytree(synth_tree, tree)
    broken = next(tree.iterdir()) / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = ["--checkpoint", str(file), "--folder", str(tree), "--num-workers", "0", "--cpu"]
    message = _one_line_exit([*argv, "--out", str(tmp_path / "o"), "--strict"])
    assert str(broken) in message and "1 of 97 images" in message and not (tmp_path / "o").exists()
    wrong = tmp_path / "config.yaml"
    wrong.write_text("model: {}\n")
    assert str(wrong) in _one_line_exit(
        ["--checkpoint", str(wrong), "--folder", str(synth_tree), "--out", str(tmp_path / "o")]
    )
    one_identity = _lfw_tree(tmp_path / "one", {"solo": 3})  # nothing to compare it with
    assert "at least two identities" in _one_line_exit(
        [
            "--checkpoint",
            str(file),
            "--folder",
            str(one_identity),
            "--out",
            str(tmp_path / "o"),
            "--num-workers",
            "0",
            "--cpu",
        ]
    )
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.skipif(not ORL.is_dir(), reason="ORL faces not present at ../shared/data/orl_faces")
@pytest.mark.integration
def test_eval_orl_end_to_end_writes_every_output(tmp_path):
    _, _, file = save_tiny_model(tmp_path / "run", image_size=64)
    out = tmp_path / "orl"
    main(
        [
            "--checkpoint",
            str(tmp_path / "run"),
            "--folder",
            str(ORL),
            "--out",
            str(out),
            "--flip",
            "--tsne",
            "--num-workers",
            "0",
            "--cpu",
        ]
    )
    metrics, thresholds = _assert_report(out, file.parent, tsne=True)
    assert metrics["num_genuine"] == 40 * 45 and metrics["num_impostor"] == 400 * 399 // 2 - 40 * 45
    assert metrics["num_images"] == 400 and metrics["num_identities"] == 40
    assert thresholds["flip"] is True


@pytest.mark.distributed
def test_eval_under_accelerate_launch_equals_single_process(tiny32, synth_tree, tmp_path):
    _, _, file = tiny32
    single, launched = tmp_path / "single", tmp_path / "launched"
    common = [
        "--checkpoint",
        str(file),
        "--folder",
        str(synth_tree),
        "--num-workers",
        "0",
        "--cpu",
        "--batch-size",
        "32",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched rank: oneDNN's kernels (and their last bits) depend on the thread count
    try:
        main([*common, "--out", str(single)])
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "facedist.evaluation.cli",
            *common,
            "--out",
            str(launched),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )  # 96 images: 2 batches + 1
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single, launched))
    assert a["num_genuine"] == b["num_genuine"] and a["num_impostor"] == b["num_impostor"]
    assert a["auc"] == b["auc"] and a["eer"] == b["eer"]  # exact scores of the same embeddings
