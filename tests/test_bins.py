"""Verification .bin sets: restricted unpickling, the published 10-fold protocol, facedist-eval --bin, training."""

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import save_tiny_model

from facedist.evaluation import bins
from facedist.evaluation.cli import main as eval_main
from facedist.inference import preprocess


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("bins_run"), image_size=32)


def _images(count, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]


def _jpeg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_write_and_read_round_trip_exact_bytes(tmp_path):
    encoded = [_jpeg(a) for a in _images(6)]
    bins.write_bin(tmp_path / "s.bin", encoded, [True, False, True])
    images, issame = bins.read_bin(tmp_path / "s.bin")
    assert images == encoded and issame.tolist() == [True, False, True]


def test_numpy_byte_arrays_and_python2_strings_load(tmp_path):
    encoded = [_jpeg(a) for a in _images(4)]
    # what re-dumped sets hold: numpy uint8 arrays of the encoded bytes and a numpy bool array
    (tmp_path / "np.bin").write_bytes(
        pickle.dumps(([np.frombuffer(e, np.uint8) for e in encoded], np.array([True, False])), protocol=4)
    )
    images, issame = bins.read_bin(tmp_path / "np.bin")
    assert images == encoded and issame.tolist() == [True, False]
    # Python 2's pickle of str (the original files): BINSTRING opcodes, read as bytes
    py2 = b"\x80\x02(]q\x00(U\x03abcU\x02deU\x01fU\x01ge]q\x01(\x88\x89et."
    (tmp_path / "py2.bin").write_bytes(py2)
    images, issame = bins.read_bin(tmp_path / "py2.bin")
    assert images == [b"abc", b"de", b"f", b"g"] and issame.tolist() == [True, False]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("payload", ["reduce", "object_array", "set"])
def test_pickles_asking_for_other_types_are_refused_with_one_line(tmp_path, payload):
    marker = tmp_path / "pwned"
    data = {
        "reduce": ([_Evil(str(marker)), b"x"], [True]),
        "object_array": (np.array([_Evil(str(marker)), b"x"], dtype=object), [True]),
        "set": ([b"a", b"b"], {True}),
    }[payload]
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(bins.BinFormatError) as err:
        bins.read_bin(tmp_path / "evil.bin")
    assert "evil.bin" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()  # nothing ran


@pytest.mark.parametrize(
    "content, needle",
    [
        (pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=2), "3 images for 1 pairs"),
        (pickle.dumps(([b"a", b"b"], [1]), protocol=2), "booleans"),
        (pickle.dumps(([b"a", 7], [True]), protocol=2), "image 1 is a int"),
        (pickle.dumps([b"a"], protocol=2), "expected a pickle of (bins, issame_list)"),
        (pickle.dumps(([b"a", b"b"], [True]), protocol=2)[:-5], "not a readable .bin"),
        (b"", "not a readable .bin"),
    ],
)
def test_bad_bin_files_are_one_clear_error(tmp_path, content, needle):
    (tmp_path / "bad.bin").write_bytes(content)
    with pytest.raises(bins.BinFormatError, match=None) as err:
        bins.read_bin(tmp_path / "bad.bin")
    assert needle in str(err.value) and "\n" not in str(err.value)


def _insightface_reference(distances, issame):
    """The published loop, written out: sklearn KFold(10, shuffle=False), np.less, first argmax."""
    from sklearn.model_selection import KFold

    thresholds = np.arange(0, 4, 0.01)
    accuracy = []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(len(distances))):
        acc_train = [np.mean(np.less(distances[train], t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(acc_train))]
        accuracy.append(np.mean(np.less(distances[test], best) == issame[test]))
    return np.mean(accuracy), np.std(accuracy)


@pytest.mark.parametrize("on_grid", [False, True])
def test_standard_accuracy_equals_the_published_loop(on_grid):
    rng = np.random.default_rng(1)
    issame = rng.random(203) < 0.5  # 203: folds of unequal size, as KFold makes them
    distances = np.where(issame, rng.normal(0.9, 0.35, 203), rng.normal(1.5, 0.35, 203)).clip(0, 4)
    if on_grid:  # distances exactly at thresholds: < and <= differ
        distances = np.arange(0, 4, 0.01)[np.round(distances * 100).astype(int).clip(0, 399)]
    mean, std = _insightface_reference(distances, issame)
    result = bins.standard_accuracy(distances, issame)
    assert result["accuracy"] == pytest.approx(mean, abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert len(result["fold_accuracies"]) == 10 and 0.6 < mean < 1.0


def test_fit_square_resizes_the_shorter_side_then_centre_crops():
    image = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8)[None, :, None], (30, 1, 3)))  # 60 x 30
    out = bins.fit_square(image, 15)
    assert out.size == (15, 15)
    column = np.asarray(out)[7, :, 0].astype(int)
    expected = np.asarray(image.resize((30, 15), Image.Resampling.BICUBIC))[7, 7:22, 0].astype(int)
    assert np.array_equal(column, expected)  # the middle of the 30x15 resize, not a squashed 60x30


def _reference_embeddings(model, pre, encoded):
    size = int(pre["image_size"])
    x = torch.stack(
        [preprocess(bins.fit_square(Image.open(io.BytesIO(data)).convert("RGB"), size), pre) for data in encoded]
    )
    with torch.no_grad():
        return torch.nn.functional.normalize(model(x) + model(x.flip(-1)), dim=1).numpy()


def test_evaluate_set_flip_sums_resizes_said_once(tiny, tmp_path, capsys):
    model, pre, _ = tiny
    encoded = [_jpeg(a) for a in _images(40, size=(48, 40))]
    issame = np.arange(20) % 2 == 0
    bins.write_bin(tmp_path / "agedb_30.bin", encoded, issame)
    bin_set = bins.load_set(tmp_path / "agedb_30.bin")
    metrics, embeddings = bins.evaluate_set(model, bin_set, pre, batch_size=40)
    bins.evaluate_set(model, bin_set, pre, batch_size=40)  # as training does at every evaluation
    assert capsys.readouterr().err.count("resized") == 1
    reference = _reference_embeddings(model, pre, encoded)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)
    distances = ((reference[0::2] - reference[1::2]) ** 2).sum(1)
    assert metrics["accuracy"] == pytest.approx(_insightface_reference(distances, issame)[0], abs=1e-9)
    assert metrics["num_genuine"] == 10 and metrics["num_impostor"] == 10 and 0 <= metrics["auc"] <= 1


def test_facedist_eval_bin_writes_reports_anyone_can_recompute(tiny, tmp_path, synth_tree):
    _, _, model_file = tiny
    bins.write_bin_from_folder(synth_tree, tmp_path / "lfw.bin", num_pairs=30, seed=0)
    bins.write_bin(tmp_path / "cfp_fp.bin", [_jpeg(a) for a in _images(20)], np.arange(10) % 2 == 0)
    out = tmp_path / "out"
    assert (
        eval_main(
            [
                "--checkpoint",
                str(model_file),
                "--bin",
                str(tmp_path / "lfw.bin"),
                "--bin",
                str(tmp_path / "cfp_fp.bin"),
                "--out",
                str(out),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    for name, pairs in (("lfw", 30), ("cfp_fp", 10)):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert (out / name / "roc.png").stat().st_size > 0
        saved = np.load(out / f"{name}_embeddings.npz", allow_pickle=False)
        assert saved["embeddings"].shape[0] == 2 * pairs and saved["issame"].shape == (pairs,)
        np.testing.assert_allclose(np.linalg.norm(saved["embeddings"], axis=1), 1.0, atol=1e-5)
        assert bins.bin_metrics(saved["embeddings"], saved["issame"])["accuracy"] == metrics["accuracy"]
        for key in ("accuracy", "accuracy_std", "auc", "eer", "tar_at_far"):
            assert key in metrics


def test_facedist_eval_refuses_an_unsafe_bin_in_one_line(tiny, tmp_path):
    _, _, model_file = tiny
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps(([_Evil(str(tmp_path / "x")), b"y"], [True]), protocol=2))
    with pytest.raises(SystemExit) as err:
        eval_main(["--checkpoint", str(model_file), "--bin", str(tmp_path / "lfw.bin"), "--out", str(tmp_path / "o")])
    assert "refused to load" in str(err.value.code) and not (tmp_path / "x").exists()


@pytest.mark.integration
def test_training_logs_bin_accuracy_and_keeps_the_best(synth_shards, synth_tree, tiny_model_overrides, tmp_path):
    bins.write_bin_from_folder(synth_tree, tmp_path / "lfw.bin", num_pairs=20, seed=0)
    out = tmp_path / "run"
    args = [
        *tiny_model_overrides,
        "data.num_workers=0",
        f"data.shards={synth_shards}",
        "train.max_steps=2",
        "train.log_every=2",
        "eval.every=2",
        "checkpoint.every=0",
        "eval.bn_recal_batches=1",
        "data.classes_per_batch=4",
        "data.images_per_class=2",
        f"eval.bins=[{tmp_path / 'lfw.bin'}]",
        f"output_dir={out}",
        "optim.lr=1e-2",
    ]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "facedist" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "lfw_acc" in r]
    assert [r["step"] for r in evaluated] == [0, 2]
    best = -1.0
    for r in evaluated:
        best = max(best, r["lfw_acc"])
        assert r["lfw_acc_best"] == best and 0.0 <= r["lfw_acc"] <= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("lfw_acc")] == [0, 2]


def test_eval_bins_config_is_validated():
    from facedist.config import ConfigError, load_config

    assert load_config(None, ["eval.bins=[a/lfw.bin, b/cfp_fp.bin]"]).eval.bins == ["a/lfw.bin", "b/cfp_fp.bin"]
    with pytest.raises(ConfigError, match="share a name"):
        load_config(None, ["eval.bins=[a/lfw.bin, b/lfw.bin]"])
    with pytest.raises(ConfigError, match="expected a list"):
        load_config(None, ["eval.bins=lfw.bin"])


def test_best_accuracy_survives_a_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"step": 0, "lfw_acc": 0.6, "lfw_acc_best": 0.6},
                {"step": 2, "lfw_acc": 0.5, "lfw_acc_best": 0.6},
            ]
        )
    )
    evaluator = bins.TrainingBinEval([], {}, 8, 0)
    evaluator.restore_best(log)
    assert evaluator.best == {"lfw_acc": 0.6}
