"""Stop requests (signal -> agreed stop on every rank), Slurm requeue, collective timeouts."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from dist_utils import free_port, run_distributed

from facedist.preemption import StopRequest, requeue_if_slurm


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_signal_is_recorded_not_fatal(restore_handlers, sig):
    stop = StopRequest()
    stop.install()
    assert not stop.should_stop() and stop.signal_name is None
    os.kill(os.getpid(), sig)  # without the handler this would end the test process
    assert stop.should_stop()
    assert stop.signal_name == sig.name


def _agree(rank, world_size, signalled_rank):
    stop = StopRequest()
    stop.install()
    before = stop.should_stop()
    if rank == signalled_rank:
        os.kill(os.getpid(), signal.SIGTERM)
    return before, stop.should_stop(), stop.signal_name


@pytest.mark.distributed
def test_ranks_agree_to_stop_when_one_is_signalled():
    results = run_distributed(_agree, 2, 1)
    assert [(before, after) for before, after, _ in results] == [(False, True), (False, True)]
    assert results[1][2] == "SIGTERM" and results[0][2] == "a signal on another rank"


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A `scontrol` on PATH that records its arguments and exits with $FAKE_SCONTROL_STATUS."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\necho "scontrol says no" >&2\nexit ${{FAKE_SCONTROL_STATUS:-0}}\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_requeue_runs_scontrol_for_this_job(fake_scontrol, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_if_slurm()
    assert fake_scontrol.read_text().splitlines() == ["requeue 4242"]


def test_requeue_outside_slurm_does_nothing(fake_scontrol, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not requeue_if_slurm()
    assert not fake_scontrol.exists()


def test_requeue_failure_is_reported(fake_scontrol, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("FAKE_SCONTROL_STATUS", "1")
    assert not requeue_if_slurm()
    assert "scontrol requeue 7 failed: scontrol says no" in capsys.readouterr().out


def test_requeue_without_scontrol_is_reported(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol anywhere
    assert not requeue_if_slurm()
    assert "scontrol requeue 7 failed" in capsys.readouterr().out


# Rank 1 hangs (or dies) while rank 0 waits in an all-reduce; the timeout from process_group_kwargs must
# reach the process group that Accelerate creates, so rank 0 fails within seconds instead of 30 minutes.
_PEER = textwrap.dedent("""
    import os, sys, time
    import torch
    from accelerate import Accelerator
    from facedist.preemption import process_group_kwargs
    accelerator = Accelerator(kwargs_handlers=process_group_kwargs(int(sys.argv[1])))
    assert accelerator.num_processes == 2
    if accelerator.process_index == 1:
        if sys.argv[2] == "dies":
            os.kill(os.getpid(), 9)
        time.sleep(120)
        os._exit(0)
    start = time.perf_counter()
    try:
        torch.distributed.all_reduce(torch.ones(1))
    except Exception as err:  # gloo raises RuntimeError on timeout or a closed peer connection
        print(f"FAILED after {time.perf_counter() - start:.1f}s: {type(err).__name__}", flush=True)
        os._exit(3)
    print("all_reduce returned", flush=True)
""")


@pytest.mark.distributed
@pytest.mark.parametrize("peer", ["hangs", "dies"])
def test_collective_with_a_lost_peer_fails_within_the_timeout(peer):
    timeout_s = 4
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "true",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _PEER, str(timeout_s), peer],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        start = time.perf_counter()
        out, err = procs[0].communicate(timeout=60)
        elapsed = time.perf_counter() - start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert procs[0].returncode == 3, out + err[-2000:]
    assert "FAILED after" in out
    waited = float(out.split("FAILED after ")[1].split("s")[0])
    assert waited < timeout_s + 5, out  # the all-reduce itself gave up within about the timeout
    assert elapsed < 50
