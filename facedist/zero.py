"""DeepSpeed ZeRO-1/2 for the backbone, as `accelerate launch --config_file launch/deepspeed_zero{1,2}.yaml` runs it.

The backbone goes into a DeepSpeed engine: ZeRO-1 partitions its optimizer state across processes, ZeRO-2
its gradients as well; every process still holds all weights (ZeRO-3, which partitions them, is refused).
The sharded margin head stays outside the engine: its rows are already split across ranks, and it keeps its
own optimizer, clipping and checkpoint files.

What differs from DDP, and how `ZeroBackend` (the trainer's facedist.backend.Backend here) handles it:
- The backbone's step happens inside `accelerator.backward` (Accelerate calls `engine.step()`): DeepSpeed
  clips by the backbone's gradient norm (gradient_clipping = optim.grad_clip; the head is clipped by its
  own norm) and skips the step when that norm is not finite. `backbone_grad_norm_squared` reads it back.
- The optimizer runs on flat fp32 partitions: rank r holds the master weights and optimizer state of its
  slice only, so nothing in `optimizer.state` is keyed by a model parameter.
- ScheduleFree keeps two points: y, the weights gradients are taken at, and z; the weights to evaluate and
  export are x = lerp(y, z, 1 - 1/beta1). Its `eval()`/`train()` switch moves the weights between y and x
  in place. Under ZeRO that switch would move only this rank's flat fp32 partition, while the model keeps
  y until the next step copies the partitions back: evaluation, BatchNorm recalibration and export would
  silently use y. So facedist never switches: the optimizer stays in train mode for the whole run (the
  model always holds y, the point training continues from), and `evaluation_state_dict` assembles the
  full fp32 y and z of every parameter from the partitions (`safe_get_full_fp32_param`,
  `safe_get_full_optimizer_state`) and computes x out of place, as `facedist.optim.evaluation_state_dict`
  does under DDP. The evaluation copy of the model is built from it; training state is untouched.
- Optimizer state is checkpointed by DeepSpeed itself (`engine.save_checkpoint`) into the checkpoint's
  `deepspeed/` folder, each rank writing its partition together with its fp32 master weights, and read back
  after `prepare` (`engine.load_checkpoint`), so a resumed run continues exactly. Resuming needs the same
  number of processes.
- bf16 runs as under DDP: fp32 weights, forward under torch.autocast (DeepSpeed's `torch_autocast`
  section; convolution and linear gradients are reduced in bf16), rather than DeepSpeed's `bf16` mode,
  which would need the model, BatchNorm buffers included, cast to bf16 before `prepare` and would leave
  evaluation and export with bf16 weights. fp16 is refused: DeepSpeed's loss scaler skips steps that the
  trainer would count as non-finite.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from facedist.backend import DEEPSPEED_DIR, Backend
from facedist.checkpoint import CheckpointError
from facedist.optim import clip_grads_
from facedist.optim import evaluation_state_dict as average_or_schedule_free_state_dict

_TAG = "zero"  # DeepSpeed's sub-folder name for the one state a facedist checkpoint holds


def process_group_kwargs(handlers: list) -> list:
    """Accelerate kwargs handlers with the gloo backend forced when DeepSpeed runs without CUDA.

    Left alone, Accelerate finds no GPU backend, counts one process and DeepSpeed's batch-size check fails."""
    from accelerate.utils import InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return handlers
    return [dataclasses.replace(h, backend="gloo") if isinstance(h, InitProcessGroupKwargs) else h for h in handlers]


class ZeroBackend(Backend):
    """The backbone in a DeepSpeed ZeRO-1/2 engine; the sharded head stays outside it (see the module docstring)."""

    def check_precision(self, cfg) -> None:
        """fp16 is refused in `configure`, once DeepSpeed's config is at hand."""

    def prepare(self, model: torch.nn.Module, optimizer, cfg):
        configure(self.accelerator, cfg, optimizer)
        return super().prepare(model, optimizer, cfg)

    def check_resume(self, checkpoint_dir: Path, meta: dict) -> None:
        """Refuse (one line) a DDP checkpoint, or a ZeRO one written by a different number of processes."""
        if not (checkpoint_dir / DEEPSPEED_DIR).is_dir():
            raise CheckpointError(
                f"resume: {checkpoint_dir} was written without DeepSpeed; resume it without a DeepSpeed launch config"
            )
        if meta.get("world_size") != self.accelerator.num_processes:
            raise CheckpointError(
                f"resume: {checkpoint_dir} was written by {meta.get('world_size')} DeepSpeed processes, "
                f"this run has {self.accelerator.num_processes}; ZeRO partitions need the same number"
            )

    def load_optimizer_state(self, optimizer, train_state: dict) -> None:
        """DeepSpeed loads its partitions after `prepare` (`load_checkpoint_after_prepare`)."""

    def load_checkpoint_after_prepare(self, checkpoint_dir: Path) -> None:
        """This rank's optimizer partition and fp32 master weights from `checkpoint_files`."""
        load_path, _ = self.model.load_checkpoint(
            str(checkpoint_dir / DEEPSPEED_DIR), tag=_TAG, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(f"resume: {checkpoint_dir / DEEPSPEED_DIR} holds no readable DeepSpeed state")

    def optimizer_state_dict(self) -> None:
        return None  # in the checkpoint's deepspeed/ folder

    def checkpoint_files(self, rank: int) -> dict:
        """CheckpointWriter rank files: `engine.save_checkpoint` into the checkpoint's deepspeed/ folder.

        The writer hands each rank one temporary path to fill: DeepSpeed writes its own files (this rank's
        optimizer partition and fp32 master weights; the weights and engine counters on rank 0) next to it,
        and the path receives a note that this rank finished. All ranks write between the same barriers, so
        the collective save lines up; the checkpoint counts as written only once the writer renames the folder."""
        engine = self.model

        def write(tmp: Path) -> None:
            engine.save_checkpoint(str(tmp.parent), tag=_TAG)
            tmp.write_text(f"rank {rank} saved its ZeRO partition under {_TAG}/\n")

        return {f"{DEEPSPEED_DIR}/rank_{rank:05d}.saved": write}

    def grad_norm_squared(self) -> torch.Tensor:
        """The backbone's squared gradient norm as DeepSpeed measured it in its step (inf when it skipped)."""
        return torch.as_tensor(self.model.get_global_grad_norm(), dtype=torch.float32).square()

    def clip_(self, head_params: list, grad_norm: torch.Tensor, head_norm_squared: torch.Tensor, max_norm: float):
        """DeepSpeed clipped and stepped (or skipped) the backbone in backward: the head by its own norm."""
        clip_grads_(head_params, head_norm_squared.sqrt(), max_norm)

    def evaluation_state_dict(self, average) -> dict[str, torch.Tensor]:
        if average is not None:  # the moving average is a plain module outside the engine
            return average_or_schedule_free_state_dict(self.raw_model, self.optimizer, average)
        return evaluation_state_dict(self.raw_model, self.optimizer)


def configure(accelerator, cfg, optimizer) -> None:
    """Before `accelerator.prepare`: fill what DeepSpeed's config leaves to the trainer; refuse (one line) what
    facedist does not handle."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage")
    if stage not in (1, 2):
        raise SystemExit(
            f"deepspeed: zero_stage {stage} is not supported, use 1 or 2 (launch/deepspeed_zero1.yaml, "
            "deepspeed_zero2.yaml); stage 3 partitions the weights, which evaluation and export read whole"
        )
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") not in ("none", None):
            raise SystemExit(f"deepspeed: {key}_device must be none (facedist's optimizers run where the weights are)")
    if cfg.train.mixed_precision == "fp16":
        raise SystemExit(
            "train.mixed_precision: fp16 is not supported with DeepSpeed, use bf16 or no "
            "(DeepSpeed's loss scaler skips steps facedist would count as non-finite)"
        )
    per_process = cfg.data.images_per_step()
    ds["train_micro_batch_size_per_gpu"] = per_process
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = per_process * accelerator.num_processes
    ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.train.mixed_precision == "bf16":  # as under DDP: fp32 weights, forward in torch.autocast
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    # ScheduleFree's train() leaves an empty state entry per model parameter; DeepSpeed steps flat partitions
    # instead, and the optimizer's state_dict refuses state keyed by tensors none of its groups hold
    for p in [p for p, state in optimizer.state.items() if not state]:
        del optimizer.state[p]


@torch.no_grad()
def evaluation_state_dict(model: torch.nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """The weights to evaluate and export (the unwrapped `model`'s state dict at fp32 precision): ScheduleFree's
    x = lerp(y, z, 1 - 1/beta1) from the full fp32 y and z gathered out of the ZeRO partitions, else y.

    Collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from facedist.optim import is_schedule_free

    zero_optimizer = optimizer
    while not hasattr(zero_optimizer, "bit16_groups"):  # DeepSpeed's, possibly inside Accelerate's wrapper
        zero_optimizer = zero_optimizer.optimizer
    client = zero_optimizer.optimizer
    schedule_free = is_schedule_free(client)
    group_of = {id(p): client.param_groups[i] for i, params in enumerate(zero_optimizer.bit16_groups) for p in params}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        group = group_of.get(id(p))
        if group is None:  # frozen, not optimized: the model's own value (the same set on every rank)
            continue
        y = safe_get_full_fp32_param(p)
        # z exists once the optimizer stepped (k counts steps, equal on every rank: all join the all-reduce)
        if schedule_free and group["k"] > 0:
            if not group["train_mode"]:
                raise RuntimeError("ScheduleFree optimizer is in eval mode under ZeRO: the partitions hold x, not y")
            beta = group["betas"][0] if "betas" in group else group["momentum"]
            y = torch.lerp(y, safe_get_full_optimizer_state(p, "z"), 1 - 1 / beta)
        state[name] = y.to(p.device)
    return state
