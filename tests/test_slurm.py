"""`sbatch slurm/train.sh` on a real Slurm cluster brought up on this machine (slurm/cluster_up.sh: one
slurmctld, 2 emulated nodes on loopback addresses): 2-node training equals a 2-process single-node run;
a signalled job checkpoints, requeues itself and resumes to the same losses; a rank killed with -9 ends
the job within 60 s and a resubmitted job resumes from the latest complete checkpoint.

Needs root (the daemons, /etc/slurm, /etc/hosts) and Debian's Slurm packages (installed by
cluster_up.sh with apt-get when missing). Skipped when that is not possible, except with CI=true, where
they fail instead so that CI cannot pass by skipping them.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_model import TINY_MODEL_OVERRIDES

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
# The demo config, made tiny: 2 processes x P=4 identities x M=2 images per step
OVERRIDES = [
    *TINY_MODEL_OVERRIDES,
    "data.num_workers=1",
    "data.classes_per_batch=4",
    "data.images_per_class=2",
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "checkpoint.every=5",
    "eval.every=0",
]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _unavailable(why: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"Slurm cluster required when CI=true: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux" or os.geteuid() != 0:
        _unavailable("the test cluster needs root on Linux (slurmctld, slurmd, /etc/slurm, /etc/hosts)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        _unavailable("Slurm is not installed and apt-get is not available to install it")
    up = subprocess.run(["bash", str(REPO / "slurm" / "cluster_up.sh")], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        _unavailable(f"slurm/cluster_up.sh failed: {(up.stderr or up.stdout).strip()[-1500:]}")
    yield
    subprocess.run(["bash", str(REPO / "slurm" / "cluster_down.sh")], capture_output=True, timeout=60)


def _env():
    # sbatch exports the submitting environment to the job (--export=ALL)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def losses(output_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


def assert_same_losses(got, expected):
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, STEPS + 1))
    assert len({loss for _, loss in expected}) > 1  # the loss moves: the comparison means something
    for (step, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), f"step {step}"


@pytest.fixture(scope="module")
def reference(synth_shards, tmp_path_factory):
    """The same training as 2 processes on one machine (accelerate launch, launch/cpu_2proc.yaml)."""
    out = tmp_path_factory.mktemp("reference") / "run"
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
            *OVERRIDES,
            f"data.shards={synth_shards}",
            f"output_dir={out}",
        ],
        env={**_env(), "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(out)


def submit(shards, output_dir: Path, log: Path, *extra: str) -> str:
    """`sbatch -N 2 slurm/train.sh` from the repository root; returns the job id."""
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-N",
            "2",
            f"--output={log}",
            "slurm/train.sh",
            *OVERRIDES,
            f"data.shards={shards}",
            f"output_dir={output_dir}",
            *extra,
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def finished(job: str) -> dict | None:
    info = job_info(job)
    return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


def test_two_nodes_equal_two_processes_on_one(cluster, synth_shards, reference, tmp_path):
    log = tmp_path / "job.log"
    job = submit(synth_shards, tmp_path / "run", log)
    info = wait_for(lambda: finished(job), 300, f"job {job} to finish", log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    assert "on 2 node(s) x 1 process(es), main node1:" in log.read_text()
    assert_same_losses(losses(tmp_path / "run"), reference)


def test_signalled_job_checkpoints_requeues_and_resumes(cluster, synth_shards, reference, tmp_path):
    log, out = tmp_path / "job.log", tmp_path / "run"
    job = submit(synth_shards, out, log)
    wait_for(lambda: logged_steps(out) >= 3, 300, "step 3", log)
    # SIGUSR1 to every process of the job (batch shell, launchers, trainers, loader workers, fork servers), as
    # when Slurm signals a whole step; the batch shell passes it on too, as for `--signal=B:USR1@...`
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True)
    # Slurm holds a requeued job ~2 min (BeginTime); a test need not wait for that
    info = wait_for(
        lambda: (i := job_info(job)).get("Restarts") == "1" and i["JobState"] == "PENDING" and i,
        120,
        "the job to requeue",
        log,
    )
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    info = wait_for(lambda: finished(job), 300, f"job {job} to finish after the requeue", log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+); checkpoint written", text)
    assert stopped, text[-3000:]
    stop_step = int(stopped.group(1))
    assert 3 <= stop_step < STEPS
    # srun reports a task (the node's launcher agent) killed by the signal: it must have ignored it
    assert "User defined signal" not in text, text[-3000:]
    # one log for both runs (--open-mode=append); the second resumed from the signal's checkpoint
    assert "(restart 0)" in text and "(restart 1)" in text
    assert f"resumed from {out / 'checkpoints' / f'step_{stop_step:08d}'} at step {stop_step}" in text
    assert (out / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    assert_same_losses(losses(out), reference)


def _trainer_pids(job: str, node_id: str) -> list[int]:
    """The facedist/train.py worker processes of `job` on emulated node `node_id` (not the launcher)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if (
            any(arg.endswith(b"facedist/train.py") for arg in cmdline[:3])
            and b"accelerate.commands.launch" not in cmdline
            and environ.get(b"SLURM_JOB_ID") == job.encode()
            and environ.get(b"SLURM_NODEID") == node_id.encode()
        ):
            pids.append(int(proc.name))
    return pids


def test_killed_rank_ends_the_job_and_a_resubmission_resumes(cluster, synth_shards, reference, tmp_path):
    log, out = tmp_path / "job.log", tmp_path / "run"
    job = submit(synth_shards, out, log)
    wait_for(
        lambda: (out / "checkpoints" / "step_00000005").is_dir() and logged_steps(out) >= 7,
        300,
        "the step-5 checkpoint and step 7",
        log,
    )
    victims = _trainer_pids(job, "1")
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.monotonic()
    info = wait_for(lambda: finished(job), 60, "the other rank to give up (60 s)", log)
    assert time.monotonic() - killed_at < 60
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert not _trainer_pids(job, "0")  # rank 0 is gone too, not hanging
    before = logged_steps(out)
    assert before < STEPS

    latest = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    log2 = tmp_path / "job2.log"
    job2 = submit(synth_shards, out, log2)
    info = wait_for(lambda: finished(job2), 300, f"resubmitted job {job2} to finish", log2)
    assert info["JobState"] == "COMPLETED", log2.read_text()[-3000:]
    assert f"at step {latest}" in log2.read_text()
    assert_same_losses(losses(out), reference)


def test_resume_path_applies_to_the_first_start_only(tmp_path):
    """RESUME=PATH on the first start; a requeued restart resumes auto, or it would roll back again."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")  # `scontrol show hostnames`
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    for restarts, expected in (("0", "--resume runs/x/checkpoints/step_00000004"), ("1", "--resume auto")):
        env = {
            **_env(),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SLURM_RESTART_COUNT": restarts,
            "RESUME": "runs/x/checkpoints/step_00000004",
            "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "node1",
            "GPUS_PER_NODE": "0",
        }
        proc = subprocess.run(["bash", "slurm/train.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout, proc.stdout
