"""Stopping cleanly when the cluster or the user asks (SIGUSR1 before the time limit, SIGTERM on preemption,
SIGINT from Ctrl-C).

A signal only sets a flag; at the end of each step all ranks agree (all-reduce MAX) to stop together,
write a checkpoint, and the main process requeues the Slurm job, which resumes from that checkpoint. A
second signal (an impatient Ctrl-C) only says that the checkpoint is being written: ending the process then
would lose the steps since the last one. Collective timeouts make a rank that waits on a dead peer fail
instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess

import torch

from facedist import distributed


class StopRequest:
    """Records SIGUSR1/SIGTERM/SIGINT; `should_stop()` is the same answer on every rank (all ranks must call it)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._told_saving = False

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._record)

    def ignore_from_now_on(self) -> None:
        """The run is over (its checkpoint written): a late signal must not turn a clean exit into a kill (at
        exit Python hands its handlers back to the default actions, ignored signals stay ignored)."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _record(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        elif not self._told_saving:  # os.write: print() is not safe inside a signal handler
            self._told_saving = True
            os.write(2, b"facedist train: stopping: saving a checkpoint at the end of this step, please wait\n")

    @property
    def requested(self) -> bool:
        """A signal reached this process (this rank's vote)."""
        return self.signal_name is not None

    def agree(self, any_rank_requested: bool) -> bool:
        """Record the ranks' agreed answer (e.g. from the step's fused flags, `distributed.StepFlags`)."""
        if any_rank_requested and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return any_rank_requested

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        return self.agree(distributed.any_rank(self.requested, device))


def requeue_if_slurm() -> bool:
    """Requeue this Slurm batch job (`scontrol requeue`); False outside Slurm or when it fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"scontrol requeue {job} failed: {err}", flush=True)
        return False
    if result.returncode != 0:
        print(f"scontrol requeue {job} failed: {result.stderr.strip()}", flush=True)
        return False
    print(f"requeued Slurm job {job}; it resumes from the checkpoint just written", flush=True)
    return True


def process_group_kwargs(timeout_s: int) -> list:
    """Accelerate kwargs handlers: a collective waiting longer than `timeout_s` raises instead of hanging."""
    from accelerate.utils import InitProcessGroupKwargs

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # NCCL: tear down on timeout/error
    return [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))]
