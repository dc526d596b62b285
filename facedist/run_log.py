"""What a training run records and says: metrics.jsonl + TensorBoard, and three kinds of line for the user.

`MetricsLog` writes one JSON record per logging step (and per evaluation) on the main process; on resume it
continues from the checkpoint's step. The lines a person reads are one at the start (what is trained, on
how many processes, for how long, where to, resumed from where), one per evaluation and one at the end
(how long it took, the best validation score, the checkpoint to use). Only the main process writes or prints.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from tqdm import tqdm

from facedist import checkpoint


class MetricsLog:
    """metrics.jsonl + TensorBoard on the main process; on resume both continue from the checkpoint's step.
    `is_due(step)`: every `every` steps and at `last_step`."""

    def __init__(
        self,
        output_dir: Path,
        start_step: int,
        enabled: bool,
        superseded: Path | None = None,
        every: int = 1,
        last_step: int | None = None,
    ):
        self.enabled, self.path, self.every, self.last_step = enabled, output_dir / "metrics.jsonl", every, last_step
        self.tensorboard = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.path.exists():  # lines after the checkpoint we resume from: an interrupted run's, or a
            checkpoint.supersede_log_lines(self.path, start_step, superseded)  # rolled-back branch's (kept aside)
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def is_due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["step"])
        self.tensorboard.flush()

    def best(self, key: str) -> dict | None:
        """The logged record with the highest `key` (this run's line, resumed ones included), or None."""
        if not self.enabled or not self.path.exists():
            return None
        records = [json.loads(line) for line in self.path.read_text().splitlines()]
        scored = [r for r in records if r.get(key) is not None]
        return max(scored, key=lambda r: r[key]) if scored else None

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def say(line: str, main_process: bool) -> None:
    """One line for the user, from the main process only, without breaking tqdm's bar."""
    if main_process:
        tqdm.write(line)


def _score(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def start_line(identities: int, images: int, world: int, per_process: str, steps: int, output_dir, resumed_from) -> str:
    """What is trained, how, for how long, where to; `per_process`: "P x M" (class-balanced) or a batch size."""
    start = f"resumed from {resumed_from}" if resumed_from is not None else "from scratch"
    return (
        f"facedist train: {identities} identities, {images} images | {world} process{'es' * (world > 1)}, "
        f"global batch {per_process} x {world} | {steps} steps | output {output_dir} | {start}"
    )


def evaluation_line(step: int, metrics: dict) -> str:
    """The step's validation scores (`evaluate_validation`'s keys) and how long they took."""
    return (
        f"step {step}: val AUC {_score(metrics.get('val_auc'))}, TAR@FAR=1e-3 "
        f"{_score(metrics.get('val_tar@far=1e-3'))}, EER {_score(metrics.get('val_eer'))} "
        f"({metrics.get('val_time_s', 0):.1f} s)"
    )


def final_line(step: int, max_steps: int, seconds: float, best: dict | None, last_checkpoint, stopped: bool) -> str:
    """How the run ended: steps, wall time, the best validation AUC and the checkpoint to use."""
    ended = f"{'stopped' if stopped else 'done'} at step {step} of {max_steps} in {seconds:.0f} s"
    best_text = f"best val AUC {best['val_auc']:.4f} at step {best['step']}" if best else "no validation"
    where = f"checkpoint {last_checkpoint}" if last_checkpoint is not None else "no checkpoint"
    return f"facedist train: {ended} | {best_text} | {where}" + (" (resume with --resume auto)" if stopped else "")
