"""Train a face embedding model from shards on 1..N processes (CPU gloo or GPU NCCL).

    accelerate launch facedist/train.py --config configs/demo.yaml [key=value ...] [--resume auto|PATH]
    python facedist/train.py --config configs/demo.yaml          # one process

Results depend on the global batch only: rank r trains on slice r of the global P x M batch of each step,
augmentation is keyed by (seed, step, position), and losses see the whole global batch. Read top to
bottom: setup, data, model, objective, optimizer, resume, the loop (step, log, evaluate, checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python facedist/train.py`: import the package, not the folder's modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import copy
import dataclasses
import itertools
import json
import resource

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm import tqdm

from facedist import checkpoint, distributed, zero
from facedist.config import Config, ConfigError, load_config
from facedist.data.dataset import make_eval_loader, make_train_loader
from facedist.data.device_augment import DeviceAugment
from facedist.data.index import ShardIndex, raise_open_file_limit
from facedist.data.shards import ShardError, load_manifest
from facedist.evaluation.bins import TrainingBinEval
from facedist.evaluation.validation import evaluate_validation, validation_index, wait_group
from facedist.losses import Objective
from facedist.model import build_model, preprocessing
from facedist.optim import (
    build_optimizer,
    build_weight_average,
    clip_grads_,
    current_lr,
    evaluation_state_dict,
    grad_norm_squared,
    is_schedule_free,
    model_param_groups,
    recalibrate_batchnorm,
)
from facedist.preemption import StopRequest, process_group_kwargs, requeue_if_slurm
from facedist.throughput import StepTimer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config; defaults when omitted")
    parser.add_argument("--resume", help="'auto' (latest checkpoint in output_dir, if any) or a checkpoint path")
    parser.add_argument(
        "--force", action="store_true", help="resume even if the config changed what the checkpoint depends on"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=3e-4")
    return parser.parse_args(argv)


class MetricsLog:
    """metrics.jsonl + TensorBoard on the main process; on resume both continue from the checkpoint's step."""

    def __init__(self, output_dir: Path, start_step: int, enabled: bool, superseded: Path | None = None):
        self.enabled, self.path = enabled, output_dir / "metrics.jsonl"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.path.exists():  # lines after the checkpoint we resume from: an interrupted run's, or a
            checkpoint.supersede_log_lines(self.path, start_step, superseded)  # rolled-back branch's (kept aside)
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["step"])
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg: Config = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    output_dir = Path(cfg.output_dir)
    raise_open_file_limit()  # soft -> hard: shard files, sockets and workers' pipes all count
    stop = StopRequest()
    stop.install()  # first: a SIGUSR1 during start-up (default action: die) becomes a stop after step 1

    # --- distributed setup: one Accelerator; every rank runs this same code (W = 1 included)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=zero.process_group_kwargs(process_group_kwargs(cfg.train.timeout_s)),
    )
    world, rank, device, is_main = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.device,
        accelerator.is_main_process,
    )
    if cfg.train.mixed_precision == "fp16" and accelerator.scaler is None and not zero.is_deepspeed(accelerator):
        # on CPU Accelerate gives neither fp16 autocast nor a loss scaler: the run would silently be fp32
        raise SystemExit(
            "train.mixed_precision: fp16 needs a GPU (on CPU, Accelerate has no fp16 autocast or "
            "loss scaler); use bf16 or no"
        )
    set_seed(cfg.train.seed)  # identical initial weights on every rank

    # --- data: random access into shards; rank r loads slice r of each global batch
    train_index = ShardIndex(cfg.data.shards, cfg.data.split_train)
    val_index = validation_index(cfg)
    eval_group = wait_group(cfg.eval.timeout_s) if val_index is not None else None

    # --- model, objective, optimizers
    try:
        model = build_model(cfg.model, device)
    except (FileNotFoundError, ValueError) as err:  # model.pretrained: missing file, not a fitting state dict
        raise SystemExit(str(err)) from None
    prep = {**preprocessing(model, cfg.model.image_size), "flip": cfg.eval.flip}  # stored with every checkpoint
    head = head_optimizer = None
    if cfg.loss.head != "none":
        from facedist.heads import build_head

        head, head_optimizer = build_head(cfg, train_index.num_classes, world, rank, device)
    adarand = adarand_optimizer = None
    if cfg.loss.adarand:
        from facedist.heads import build_adarand

        adarand, adarand_optimizer = build_adarand(cfg, train_index.num_classes, world, rank, device)
    objective = Objective(cfg.loss, head, adarand)
    side_optimizers = [opt for opt in (head_optimizer, adarand_optimizer) if opt is not None]  # outside DDP/ZeRO
    optimizer, scheduler = build_optimizer(
        model_param_groups(model, cfg.optim.backbone_lr_scale), cfg.optim, cfg.train.max_steps
    )
    fingerprint = load_manifest(cfg.data.shards)["splits"][cfg.data.split_train]["index_sha256"]
    dependencies = checkpoint.dependencies(cfg, train_index.num_classes, fingerprint)

    if is_main:  # only now: a start refused above (shards, weights, config) leaves no empty output_dir behind
        output_dir.mkdir(parents=True, exist_ok=True)

    # --- resume: weights and optimizer state before `prepare`, then the loop continues at the saved step
    start_step, resume_from, superseded = 0, None, None
    if args.resume:
        resume_from = (
            checkpoint.latest_checkpoint(output_dir)
            if args.resume == "auto"
            else checkpoint.resolve_checkpoint(args.resume)
        )
    if resume_from is not None:
        meta = checkpoint.check_compatible(resume_from, dependencies, args.force)
        zero.check_resume(accelerator, resume_from, meta)
        model.load_state_dict(load_file(str(resume_from / "train_model.safetensors")))
        state = checkpoint.load_torch(resume_from / "train_state.pt")
        if not zero.is_deepspeed(accelerator):  # ZeRO: DeepSpeed loads its partitions after `prepare`
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if head is not None:
            head.load_checkpoint(resume_from / "head", head_optimizer)
        if adarand is not None:
            adarand.load_checkpoint(resume_from / "adarand", adarand_optimizer)
        start_step = meta["step"]
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
        if is_main:  # rolled back: the newer checkpoints (and their log lines) are another branch, kept aside
            superseded = checkpoint.supersede_newer(output_dir, start_step)
        if cfg.model.init_from:
            accelerator.print(f"model.init_from={cfg.model.init_from} ignored: resuming this run's checkpoint wins")
    elif cfg.model.init_from:  # a new run: step 0, fresh optimizer and head, weights from elsewhere
        accelerator.print(f"model.init_from: starting from {checkpoint.init_weights_from(model, cfg.model.init_from)}")
    if resume_from is None and adarand is not None:
        # class Gaussians from the pretrained model's features of this rank's classes
        own = adarand.own_samples(train_index.class_offsets)
        loader = make_eval_loader(
            train_index, prep, cfg.eval.batch_size, num_workers=cfg.data.num_workers, samples=range(own.start, own.stop)
        )
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            adarand.init_from_features((model(images.to(device)).float(), labels) for images, labels, _ in loader)
        model.train()
    average = build_weight_average(model, cfg.optim.ema_decay)  # optim.ema_decay: evaluated and exported
    if average is not None and resume_from is not None:
        average.module.load_state_dict(load_file(str(resume_from / checkpoint.EMBEDDING_FILE)))
    if zero.is_deepspeed(accelerator):
        zero.configure(accelerator, cfg, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None and zero.is_deepspeed(accelerator):
        zero.load_checkpoint(model, resume_from)
    if resume_from is not None and accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    raw_model = accelerator.unwrap_model(model)
    if cfg.model.compile:  # in place: the wrapped model calls the compiled forward, state_dict keys unchanged
        raw_model.compile()

    train_loader = make_train_loader(train_index, cfg.data, prep, world, rank, cfg.train.seed, start_step)
    to_model_input = DeviceAugment(train_loader.dataset, device)  # uint8 -> augmented floats
    steps_per_epoch = train_loader.batch_sampler.steps_per_epoch
    log = MetricsLog(output_dir, start_step, is_main, superseded)
    bin_eval = TrainingBinEval(cfg.eval.bins, prep, cfg.eval.batch_size, cfg.data.num_workers)  # eval.bins: <set>_acc
    bin_eval.restore_best(log.path)
    writer = checkpoint.CheckpointWriter(output_dir, cfg.checkpoint.keep, rank, accelerator.wait_for_everyone)

    def evaluation_model() -> torch.nn.Module:
        """A copy at the evaluation weights, BN statistics recalibrated there (ScheduleFree); training untouched."""
        eval_model = copy.deepcopy(raw_model)
        eval_model.load_state_dict(
            zero.evaluation_state_dict(raw_model, optimizer)
            if zero.is_deepspeed(accelerator) and average is None
            else evaluation_state_dict(raw_model, optimizer, average)
        )
        # each rank's BN statistics are its own batches' (DDP broadcasts rank 0's only before a forward, ZeRO
        # never): every rank evaluates rank 0's, which the checkpoint holds
        distributed.broadcast_float_buffers(eval_model)
        if is_schedule_free(optimizer) and cfg.model.bn != "frozen" and cfg.eval.bn_recal_batches > 0:
            recal = make_train_loader(
                train_index,
                dataclasses.replace(cfg.data, num_workers=0),
                prep,
                world,
                rank,
                cfg.train.seed + 1,
                start_step=0,
            )
            batches = itertools.islice(recal, cfg.eval.bn_recal_batches)
            with accelerator.autocast():
                recalibrate_batchnorm(eval_model, (to_model_input(batch)[0] for batch in batches))
        return eval_model.eval()

    def evaluate(eval_model, step: int) -> dict | None:
        """Validation metrics (rank 0; {} elsewhere), or None when a stop signal came meanwhile (abandoned)."""
        return evaluate_validation(
            eval_model,
            val_index,
            cfg,
            prep,
            device,
            accelerator.autocast,
            step,
            log.tensorboard if is_main else None,
            eval_group,
            lambda: stop.should_stop(device),
        )

    def save(step: int, eval_model: torch.nn.Module) -> None:
        train_state = {
            "optimizer": None if zero.is_deepspeed(accelerator) else optimizer.state_dict(),  # ZeRO: deepspeed/
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        metadata = {"facedist": json.dumps({"preprocessing": prep, "config": cfg.to_dict(), "step": step})}
        main_files = {
            checkpoint.EMBEDDING_FILE: checkpoint.save_safetensors(eval_model.state_dict(), metadata),
            "train_model.safetensors": checkpoint.save_safetensors(raw_model.state_dict()),
            "train_state.pt": checkpoint.save_torch(train_state),
        }
        rank_files = head.checkpoint_files("head", head_optimizer) if head is not None else {}
        if adarand is not None:
            rank_files.update(adarand.checkpoint_files("adarand", adarand_optimizer))
        if zero.is_deepspeed(accelerator):
            rank_files.update(zero.checkpoint_files(model, rank))
        writer.save(step, {"world_size": world, "dependencies": dependencies}, main_files, rank_files)

    # --- the loop
    head_params = list(head.parameters()) if head is not None else []
    model.train()
    if start_step == 0 and val_index is not None:
        eval_model = evaluation_model()
        log.write({"step": 0, "epoch": 0, **(evaluate(eval_model, 0) or {}), **bin_eval(eval_model)})
    batches = iter(train_loader)
    nonfinite_in_a_row, step, stopping = 0, start_step, False
    progress = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not is_main, desc="train")
    timer, flags = StepTimer(device), distributed.StepFlags(device)
    while step < cfg.train.max_steps:
        timer.waiting_for_data()
        images, labels = to_model_input(next(batches))  # uint8 batch -> augmented, normalised floats on the device
        timer.data_ready()

        with accelerator.autocast():
            embeddings = model(images)
        loss, logged = objective(embeddings, labels, step)
        accelerator.backward(loss)
        if accelerator.scaler is not None:  # fp16: unscale before measuring/clipping; head unscaled too
            accelerator.unscale_gradients()
            for side_optimizer in side_optimizers:
                accelerator.scaler.unscale_(side_optimizer)
        # one global norm over backbone + head shards (AdaRand's means follow their own objective, unclipped);
        # the head's share, the finiteness flags and the stop request travel in ONE all-reduce, read once
        backbone_norm_squared = (
            zero.backbone_grad_norm_squared(model)
            if zero.is_deepspeed(accelerator)
            else grad_norm_squared(raw_model.parameters())
        )
        head_norm_squared = flags.reduce(
            logged["loss"], backbone_norm_squared, grad_norm_squared(head_params), stop.requested
        )
        grad_norm = (backbone_norm_squared.to(device) + head_norm_squared).sqrt()
        if zero.is_deepspeed(accelerator):  # DeepSpeed clipped and stepped (or skipped) the backbone in backward
            clip_grads_(head_params, head_norm_squared.sqrt(), cfg.optim.grad_clip)
        else:
            clip_grads_([*raw_model.parameters(), *head_params], grad_norm, cfg.optim.grad_clip)
        flags.read()
        if flags.loss_bad or flags.grad_bad:
            # skipped on every rank; an fp16 overflow with a finite loss is the scaler's business, not an error
            if accelerator.scaler is not None and not flags.loss_bad:
                accelerator.scaler.update(accelerator.scaler.get_scale() * accelerator.scaler.get_backoff_factor())
            else:
                nonfinite_in_a_row += 1
                accelerator.print(
                    f"step {step + 1}: non-finite loss or gradient, step skipped ({nonfinite_in_a_row} in a row)"
                )
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise SystemExit(
                        f"stopping: {nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_steps); "
                        "lower optim.lr, enable optim.grad_clip or use bf16 instead of fp16"
                    )
            for opt in (optimizer, *side_optimizers):
                opt.zero_grad(set_to_none=True)
        else:
            nonfinite_in_a_row = 0
            for side_optimizer in side_optimizers:
                if accelerator.scaler is not None:
                    accelerator.scaler.step(side_optimizer)
                else:
                    side_optimizer.step()
                side_optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            if average is not None:  # foreach lerps on the device, no host read
                average.update(raw_model, step + 1)
        step += 1
        progress.update(1)

        record = None
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:  # the only step that reads values
            values = dict(zip([*logged, "grad_norm"], torch.stack([*logged.values(), grad_norm]).tolist()))
            record = {
                "step": step,
                "epoch": (step - 1) // steps_per_epoch,
                **values,
                "lr": current_lr(optimizer),
                **timer.read(len(labels) * world),
                "memory_mb": memory_mb(device),
                "nonfinite_in_a_row": nonfinite_in_a_row,
            }
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        stopping = stop.agree(flags.stop)
        # stopping: checkpoint at once (Slurm's KillWait), no evaluation
        eval_due = (
            not stopping and val_index is not None and (step % cfg.eval.every == 0 or step == cfg.train.max_steps)
        )
        ckpt_due = (
            stopping or step == cfg.train.max_steps or (cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0)
        )
        if eval_due or ckpt_due:
            eval_model = evaluation_model()
            if eval_due:
                evaluated = evaluate(eval_model, step)
                stopping = evaluated is None  # a stop signal during the evaluation: abandoned, checkpoint now
                record = {
                    **(record or {"step": step, "epoch": (step - 1) // steps_per_epoch}),
                    **(evaluated or {}),
                    **(bin_eval(eval_model) if evaluated is not None else {}),
                }
            if ckpt_due or stopping:
                save(step, eval_model)
            del eval_model
        if record is not None:
            log.write(record)
        if stopping:
            accelerator.print(f"stopped by {stop.signal_name} at step {step}; checkpoint written")
            break

    progress.close()
    log.close()
    accelerator.wait_for_everyone()  # before tearing down: avoids gloo's abort at exit
    if stopping and is_main:  # every rank is past its checkpoint files: the requeued job may start now
        requeue_if_slurm()
    accelerator.end_training()
    if distributed.is_distributed():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ShardError, checkpoint.CheckpointError, ConfigError) as err:  # bad shards, refused resume, bad combination
        sys.exit(f"facedist train: {err}")
