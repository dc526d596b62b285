"""ShardIndex: class ranges, random-access bytes equal to the tar members, fork/pickle safety."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import tarfile

import numpy as np
import pytest

from facedist.data.index import ShardIndex
from facedist.data.shards import ShardError


def _tar_samples(root, split):
    """{key: (image bytes, label, identity)} read with tarfile, independently of the index."""
    samples = {}
    for path in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_read_image_bytes_equal_tar_members(synth_shards):
    for split in ("train", "val"):
        index = ShardIndex(synth_shards, split)
        samples = _tar_samples(synth_shards, split)
        assert index.num_samples == len(samples)
        for i, key in enumerate(sorted(samples)):
            members = samples[key]
            assert index.read_image_bytes(i) == members["jpg"]
            assert int(index.labels[i]) == int(members["cls"])
            assert index.class_names[int(index.labels[i])] == json.loads(members["json"])["identity"]


def test_class_offsets_cover_each_class(synth_shards):
    index = ShardIndex(synth_shards, "train")
    assert index.class_offsets[0] == 0 and index.class_offsets[-1] == index.num_samples
    for c in range(index.num_classes):
        rows = index.labels[index.class_offsets[c] : index.class_offsets[c + 1]]
        assert len(rows) == index.images_per_class[c] > 0
        assert np.all(rows == c)
    assert index.image_size == 32 and len(index) == index.num_samples


def test_missing_split_and_out_of_range(synth_shards):
    with pytest.raises(ShardError, match="no split 'test'"):
        ShardIndex(synth_shards, "test")
    index = ShardIndex(synth_shards, "val")
    with pytest.raises(IndexError):
        index.read_image_bytes(index.num_samples)


def _read_in_child(index, i, queue):
    queue.put(index.read_image_bytes(i))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reads_after_fork_and_spawn(synth_shards, method):
    index = ShardIndex(synth_shards, "train")
    last = index.num_samples - 1
    expected = index.read_image_bytes(last)  # opens a descriptor in the parent before the child starts
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(index, last, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert got == expected
    assert index.read_image_bytes(0) == pickle.loads(pickle.dumps(index)).read_image_bytes(0)


def test_missing_or_resized_shard_is_one_error_at_start(synth_shards, tmp_path, capsys):
    import shutil

    from facedist.data.cli import main as cli_main

    root = tmp_path / "shards"
    shutil.copytree(synth_shards, root)
    (root / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar: missing \(manifest.json lists it\)"):
        ShardIndex(root, "train")
    ShardIndex(root, "val")  # the other split's shards are all there
    with open(root / "train-000002.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ShardError, match=r"train-000001\.tar: missing .*and 1 more shard files of split 'train'"):
        ShardIndex(root, "train")

    assert cli_main(["info", str(root)]) == 1  # as verify: the folder cannot be trained on
    text = capsys.readouterr().out
    assert f"train: {root / 'train-000001.tar'}: missing" in text
    assert f"train: {root / 'train-000002.tar'}: 1000 bytes, manifest.json says" in text
