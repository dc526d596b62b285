"""The demo as the README runs it (`launch/demo.sh`: synthetic identities, shards, `accelerate launch` with 2 CPU
processes), for its first 100 steps: it learns to verify unseen identities and prints its line."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 100  # of the demo's 500; RAdamScheduleFree has no schedule, so these are the full run's first 100 steps


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_training_reaches_auc_on_unseen_identities(tmp_path):
    env = {**os.environ, "SHARDS": str(tmp_path / "shards"), "OUT": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "demo.sh"), f"train.max_steps={STEPS}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_auc" in r]
    assert [r["step"] for r in evals] == list(range(0, STEPS + 1, 100)) and records[-1]["step"] == STEPS
    assert evals[0]["val_auc"] < 0.7  # an untrained model does not verify
    assert evals[-1]["val_auc"] >= 0.75  # seen: 0.59 -> 0.80 at step 100 (0.91 at 200, 0.98 at the demo's 500)
    line = re.search(rf"validation AUC on unseen identities: step 0: ([0-9.]+) -> step {STEPS}: ([0-9.]+)", proc.stdout)
    assert line, proc.stdout[-2000:]
    assert [float(x) for x in line.groups()] == [round(evals[0]["val_auc"], 4), round(evals[-1]["val_auc"], 4)]
