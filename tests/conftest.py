"""Shared pytest fixtures (small synthetic identity trees, shard folders built from them, the tiny model's
overrides) and the split of the suite into a fast unit part and an integration part.

    pytest -m "not integration"   the unit part, for an inner loop: at most 5 minutes on 2 cores
    pytest -m integration         the rest: trainings and CLIs run end to end in subprocesses, several processes
                                  (gloo), Slurm, DeepSpeed ZeRO
    pytest                        everything (the README's test command, which .ci/run calls)

A test is integration when it is marked `slow` or `distributed`, when its module is in INTEGRATION_MODULES, or
when it is marked `integration` itself (a test that takes more than about 10 s or starts a CLI in a subprocess).
"""

from __future__ import annotations

import pytest
from tiny_model import TINY_MODEL_OVERRIDES

import facedist  # noqa: F401  (torchvision compat before anything imports it)
from facedist.data.shards import BuildOptions, build
from facedist.data.synth import write_synthetic_tree

# Modules whose tests run the trainer or the head benchmark (2 processes) end to end; unit tests of the
# trainer's parts belong in other modules
INTEGRATION_MODULES = {"test_train.py", "test_zero.py", "test_slurm.py", "test_demo.py", "test_bench_head.py"}
INTEGRATION_MARKERS = ("slow", "distributed")
SYNTH_IDENTITIES = 16
SYNTH_IMAGES_PER_IDENTITY = 6
SYNTH_SIZE = 32
SYNTH_VAL_IDENTITIES = 4


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory):
    """A synthetic identity-folder tree: 16 identities x 6 images of 32 px, png."""
    root = tmp_path_factory.mktemp("synth") / "faces"
    write_synthetic_tree(root, SYNTH_IDENTITIES, SYNTH_IMAGES_PER_IDENTITY, size=SYNTH_SIZE, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def synth_shards(synth_tree, tmp_path_factory):
    """Shards of `synth_tree`: 12 train identities (72 images, 3 shards), 4 val (24 images, 1 shard); 32 px jpg."""
    out = tmp_path_factory.mktemp("shards") / "synth"
    options = BuildOptions(size=SYNTH_SIZE, max_samples=32, val_identities=str(SYNTH_VAL_IDENTITIES), seed=0)
    build(synth_tree, out, options, workers=1, progress=False)
    return out


@pytest.fixture
def tiny_model_overrides():
    """The config overrides that make a training run's model tiny (resnet10t, 16-d embeddings, 32 px)."""
    return list(TINY_MODEL_OVERRIDES)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES or any(item.get_closest_marker(m) for m in INTEGRATION_MARKERS):
            item.add_marker(pytest.mark.integration)
