"""The demo end to end: `accelerate launch` with 2 CPU processes learns to verify unseen identities."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_training_reaches_auc_on_unseen_identities(tmp_path):
    cli = [sys.executable, "-m", "facedist.data.cli"]
    subprocess.run(
        [
            *cli,
            "synth",
            str(tmp_path / "faces"),
            "--identities",
            "300",
            "--images-per-identity",
            "12",
            "--size",
            "64",
            "--seed",
            "0",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *cli,
            "build",
            str(tmp_path / "faces"),
            str(tmp_path / "shards"),
            "--size",
            "64",
            "--format",
            "png",
            "--val-identities",
            "60",
            "--test-identities",
            "40",
            "--seed",
            "0",
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "launch" / "cpu_2proc.yaml"),
            str(REPO / "facedist" / "train.py"),
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"data.shards={tmp_path / 'shards'}",
            f"output_dir={tmp_path / 'run'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_auc" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == records[-1]["step"]
    assert evals[0]["val_auc"] < 0.75  # an untrained model does not verify
    assert evals[-1]["val_auc"] >= 0.95  # seen: 0.59 -> 0.97
