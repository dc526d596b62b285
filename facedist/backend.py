"""How the backbone is data-parallel: DDP (one process included) or DeepSpeed ZeRO, chosen once per run.

The trainer talks to one `Backend` and never asks which it is. Each answers the same questions its own way:
how the model and optimizer are wrapped (`prepare`), the backbone's squared gradient norm and how it is
clipped, which weights to evaluate and export, which checkpoint files hold the optimizer state and how that
state comes back on resume. Under DDP the optimizer's state is one `state_dict` in train_state.pt and the
trainer clips backbone and head together by one global norm; ZeRO's differences are in facedist/zero.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from facedist.checkpoint import CheckpointError
from facedist.optim import clip_grads_, evaluation_state_dict, grad_norm_squared

DEEPSPEED_DIR = "deepspeed"  # inside a checkpoint directory: DeepSpeed's own files (optimizer partitions)


def build_backend(accelerator) -> Backend:
    """The backend of this launch: ZeRO under a DeepSpeed launch config, else DDP."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from facedist.zero import ZeroBackend

        return ZeroBackend(accelerator)
    return Backend(accelerator)


class Backend:
    """DDP through Accelerate (a plain module on one process); `prepare` must come before the other calls
    except `check_precision`, `check_resume` and `load_optimizer_state`."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.model = self.raw_model = self.optimizer = None

    def check_precision(self, cfg) -> None:
        """Refuse (one line) a precision this backend would not really run."""
        if cfg.train.mixed_precision == "fp16" and self.accelerator.scaler is None:
            # on CPU Accelerate gives neither fp16 autocast nor a loss scaler: the run would silently be fp32
            raise SystemExit(
                "train.mixed_precision: fp16 needs a GPU (on CPU, Accelerate has no fp16 autocast or "
                "loss scaler); use bf16 or no"
            )

    def prepare(self, model: torch.nn.Module, optimizer, cfg):
        """(wrapped model, wrapped optimizer); keeps both and the unwrapped model for the calls below."""
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.raw_model = self.accelerator.unwrap_model(self.model)
        return self.model, self.optimizer

    def check_resume(self, checkpoint_dir: Path, meta: dict) -> None:
        """Refuse (one line) a checkpoint whose optimizer state this backend cannot load."""
        if (checkpoint_dir / DEEPSPEED_DIR).is_dir():
            raise CheckpointError(
                f"resume: {checkpoint_dir} holds DeepSpeed ZeRO optimizer state; resume it with "
                "launch/deepspeed_zero1.yaml or deepspeed_zero2.yaml"
            )

    def load_optimizer_state(self, optimizer, train_state: dict) -> None:
        """Before `prepare`: the optimizer's state from train_state.pt."""
        optimizer.load_state_dict(train_state["optimizer"])

    def load_checkpoint_after_prepare(self, checkpoint_dir: Path) -> None:
        """After `prepare`: state that only the wrapped model can load (none under DDP)."""

    def optimizer_state_dict(self) -> dict | None:
        """The optimizer's state for train_state.pt."""
        return self.optimizer.state_dict()

    def checkpoint_files(self, rank: int) -> dict:
        """CheckpointWriter rank files of the backend's own (none under DDP)."""
        return {}

    def grad_norm_squared(self) -> torch.Tensor:
        """The backbone's squared gradient norm, on the device (no host read)."""
        return grad_norm_squared(self.raw_model.parameters())

    def clip_(self, head_params: list, grad_norm: torch.Tensor, head_norm_squared: torch.Tensor, max_norm: float):
        """Clip backbone and head together by the global norm (`grad_norm`, non-finite: left alone)."""
        clip_grads_([*self.raw_model.parameters(), *head_params], grad_norm, max_norm)

    def evaluation_state_dict(self, average) -> dict[str, torch.Tensor]:
        """The weights to evaluate and export (see facedist.optim.evaluation_state_dict); training untouched."""
        return evaluation_state_dict(self.raw_model, self.optimizer, average)
