"""Train a face embedding model from shards on 1..N processes (CPU gloo or GPU NCCL).

    accelerate launch facedist/train.py --config configs/demo.yaml [key=value ...] [--resume auto|PATH]
    python facedist/train.py --config configs/demo.yaml          # one process
    facedist-train --config configs/demo.yaml                    # the same, as a console script

Results depend on the global batch only: rank r trains on slice r of the global P x M batch of each step,
augmentation is keyed by (seed, step, position), and losses see the whole global batch. `Trainer` reads top
to bottom: build (distributed setup, data, model and objective, optimizers), resume or start fresh, prepare,
then the loop (step, log, evaluate, checkpoint). What differs between DDP and DeepSpeed ZeRO hides behind
one backend (facedist/backend.py); the optimizers step as one (`facedist.optim.Optimizers`); the validator
and the checkpoint writer say when they are due; resume is facedist.checkpoint.find_resume.
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
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from facedist import checkpoint, distributed, zero
from facedist.backend import build_backend
from facedist.config import Config, ConfigError, load_config
from facedist.data.dataset import make_eval_loader, make_train_loader
from facedist.data.device_augment import DeviceAugment
from facedist.data.index import ShardIndex, raise_open_file_limit
from facedist.data.sampler import make_batch_sampler
from facedist.data.shards import ShardError, load_manifest
from facedist.evaluation.bins import TrainingBinEval
from facedist.evaluation.validation import Validator, validation_index, wait_group
from facedist.losses import Objective
from facedist.model import build_model, preprocessing
from facedist.optim import (
    Optimizers,
    build_optimizer,
    build_weight_average,
    grad_norm_squared,
    is_schedule_free,
    model_param_groups,
    recalibrate_batchnorm,
)
from facedist.preemption import StopRequest, process_group_kwargs, requeue_if_slurm
from facedist.run_log import MetricsLog, evaluation_line, final_line, memory_mb, say, start_line
from facedist.throughput import StepTimer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", help="YAML config; the defaults when omitted")
    parser.add_argument(
        "--resume", help="'auto' (the newest checkpoint in output_dir that verifies, if any) or a checkpoint path"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="resume even if the config changed what the checkpoint depends on (tensor shapes must still fit)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=3e-4")
    return parser.parse_intermixed_args(argv)  # key=value anywhere, --resume before or after them


class Trainer:
    """One training run. `Trainer(cfg, resume, force)` builds everything, resumes (or starts at step 0) and
    prepares; `train()` runs the loop; `evaluate()` and `save()` are what the loop calls when the validator
    and the checkpoint writer say they are due. Every rank builds the same Trainer (W = 1 included)."""

    def __init__(self, cfg: Config, resume: str | None = None, force: bool = False):
        self.cfg, self.output_dir = cfg, Path(cfg.output_dir)
        raise_open_file_limit()  # soft -> hard: shard files, sockets and workers' pipes all count
        self.stop = StopRequest()
        self.stop.install()  # first: a SIGUSR1 during start-up (default action: die) becomes a stop after step 1
        self._build_distributed()
        self._build_data()
        self._build_model()
        self._build_optimizers()
        # only now: a start refused above (shards, weights, config) leaves no empty output_dir behind; and
        # before any step: an output_dir that cannot take a checkpoint is found now, not at the first one
        unwritable = distributed.broadcast_object(checkpoint.writable_output(self.output_dir) if self.is_main else None)
        if unwritable is not None:
            raise checkpoint.CheckpointError(unwritable)
        self._resume_or_start(resume, force)
        self._prepare()
        self._build_loop()

    def _build_distributed(self) -> None:
        """One Accelerator and the backend it implies; every rank runs this same code."""
        cfg = self.cfg
        self.accelerator = accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            kwargs_handlers=zero.process_group_kwargs(process_group_kwargs(cfg.train.timeout_s)),
        )
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.device, self.is_main = accelerator.device, accelerator.is_main_process
        self.backend = build_backend(accelerator)
        self.backend.check_precision(cfg)
        set_seed(cfg.train.seed)  # identical initial weights on every rank

    def _build_data(self) -> None:
        """Random access into shards; rank r loads slice r of each global batch (the loader comes last)."""
        cfg = self.cfg
        self.train_index = ShardIndex(cfg.data.shards, cfg.data.split_train)
        try:  # a batch the identities cannot fill is refused here, before any worker starts
            make_batch_sampler(self.train_index, cfg.data, self.world, self.rank, cfg.train.seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.val_index = validation_index(cfg)
        self.eval_group = wait_group(cfg.eval.timeout_s) if self.val_index is not None else None

    def _build_model(self) -> None:
        """The embedding model, the row-sharded modules outside DDP/ZeRO (margin head, AdaRand), the objective."""
        cfg, num_classes = self.cfg, self.train_index.num_classes
        try:
            self.model = build_model(cfg.model, self.device)
        except (FileNotFoundError, ValueError) as err:  # model.pretrained: missing file, not a fitting state dict
            raise SystemExit(str(err)) from None
        self.prep = {**preprocessing(self.model, cfg.model.image_size), "flip": cfg.eval.flip}  # in every checkpoint
        self.head = self.adarand = head_optimizer = adarand_optimizer = None
        if cfg.loss.head != "none":
            from facedist.heads import build_head

            self.head, head_optimizer = build_head(cfg, num_classes, self.world, self.rank, self.device)
        if cfg.loss.adarand:
            from facedist.heads import build_adarand

            self.adarand, adarand_optimizer = build_adarand(cfg, num_classes, self.world, self.rank, self.device)
        self.objective = Objective(cfg.loss, self.head, self.adarand)
        # (checkpoint folder, module, its optimizer): each rank saves and loads its own rows
        self.sharded = [
            (name, module, optimizer)
            for name, module, optimizer in (
                ("head", self.head, head_optimizer),
                ("adarand", self.adarand, adarand_optimizer),
            )
            if module is not None
        ]
        self.head_params = list(self.head.parameters()) if self.head is not None else []

    def _build_optimizers(self) -> None:
        cfg = self.cfg
        optimizer, scheduler = build_optimizer(
            model_param_groups(self.model, cfg.optim.backbone_lr_scale), cfg.optim, cfg.train.max_steps
        )
        side = [optimizer for _, _, optimizer in self.sharded]
        self.optimizers = Optimizers(
            optimizer,
            side,
            scheduler,
            self.accelerator.scaler,
            self.backend,
            cfg.train.max_nonfinite_steps,
            log=self.accelerator.print,
        )
        fingerprint = load_manifest(cfg.data.shards)["splits"][cfg.data.split_train]["index_sha256"]
        self.dependencies = checkpoint.dependencies(cfg, self.train_index.num_classes, fingerprint)

    def _resume_or_start(self, resume: str | None, force: bool) -> None:
        """Weights and optimizer state from a checkpoint (before `prepare`; the loop continues at its step),
        or a new run at step 0."""
        cfg = self.cfg
        self.resumed = checkpoint.find_resume(
            resume, self.output_dir, self.dependencies, force, self.backend.check_resume
        )
        self.step, self.superseded = 0, None
        if self.resumed is None:
            self._start_fresh()
            return
        self.resumed.load_training_weights(self.model)
        self.optimizers.load_state_dict(self.resumed.train_state)
        for name, module, optimizer in self.sharded:
            module.load_checkpoint(self.resumed.directory / name, optimizer)
        self.step = self.resumed.step
        self.accelerator.print(f"resumed from {self.resumed.directory} at step {self.step}")
        if self.is_main:
            self.superseded = self.resumed.supersede_newer(self.output_dir)
        if cfg.model.init_from:
            self.accelerator.print(
                f"model.init_from={cfg.model.init_from} ignored: resuming this run's checkpoint wins"
            )

    def _start_fresh(self) -> None:
        """Step 0: weights from `model.init_from` (fresh optimizer and head), AdaRand's class Gaussians."""
        cfg = self.cfg
        if cfg.model.init_from:
            loaded = checkpoint.init_weights_from(self.model, cfg.model.init_from)
            self.accelerator.print(f"model.init_from: starting from {loaded}")
        if self.adarand is not None:  # from the pretrained model's features of this rank's classes
            own = self.adarand.own_samples(self.train_index.class_offsets)
            loader = make_eval_loader(
                self.train_index,
                self.prep,
                cfg.eval.batch_size,
                num_workers=cfg.data.num_workers,
                samples=range(own.start, own.stop),
            )
            self.model.eval()
            with torch.no_grad(), self.accelerator.autocast():
                features = ((self.model(images.to(self.device)).float(), labels) for images, labels, _ in loader)
                self.adarand.init_from_features(features)
            self.model.train()

    def _prepare(self) -> None:
        """The weight average (`optim.ema_decay`, from the loaded weights), then the backend wraps the model."""
        cfg = self.cfg
        average = build_weight_average(self.model, cfg.optim.ema_decay)
        if average is not None and self.resumed is not None:
            self.resumed.load_evaluation_weights(average.module)
        self.optimizers.average = average
        self.model, self.optimizers.backbone = self.backend.prepare(self.model, self.optimizers.backbone, cfg)
        if self.resumed is not None:
            self.backend.load_checkpoint_after_prepare(self.resumed.directory)
        self.raw_model = self.backend.raw_model
        if cfg.model.compile:  # in place: the wrapped model calls the compiled forward, state_dict keys unchanged
            self.raw_model.compile()

    def _build_loop(self) -> None:
        """The training loader (from the resumed step), the log, the validator, the checkpoint writer."""
        cfg = self.cfg
        self.train_loader = make_train_loader(
            self.train_index, cfg.data, self.prep, self.world, self.rank, cfg.train.seed, self.step
        )
        self.to_model_input = DeviceAugment(self.train_loader.dataset, self.device)  # uint8 -> augmented floats
        self.steps_per_epoch = self.train_loader.batch_sampler.steps_per_epoch
        self.log = MetricsLog(
            self.output_dir, self.step, self.is_main, self.superseded, cfg.train.log_every, cfg.train.max_steps
        )
        bins = TrainingBinEval(cfg.eval.bins, self.prep, cfg.eval.batch_size, cfg.data.num_workers)  # <set>_acc
        bins.restore_best(self.log.path)
        self.validator = Validator(
            cfg, self.val_index, self.eval_group, self.prep, self.device, self.accelerator.autocast, bins
        )
        self.checkpointer = checkpoint.CheckpointWriter(
            self.output_dir,
            cfg.checkpoint.keep,
            self.rank,
            self.accelerator.wait_for_everyone,
            every=cfg.checkpoint.every,
            last_step=cfg.train.max_steps,
        )
        self.last_checkpoint = self.resumed.directory if self.resumed is not None else None
        self.timer, self.flags = StepTimer(self.device), distributed.StepFlags(self.device)

    def train(self) -> None:
        """The loop: step, log, evaluate and checkpoint when due; a stop signal ends it at a checkpoint."""
        cfg, started = self.cfg, time.perf_counter()
        say(self.start_line(), self.is_main)
        self.model.train()
        if self.step == 0 and self.validator.enabled:
            self.log.write({"step": 0, "epoch": 0, **(self.evaluate() or {})})
        batches = iter(self.train_loader)
        progress = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not self.is_main, desc="train")
        stopping = False
        while self.step < cfg.train.max_steps and not stopping:
            self.timer.waiting_for_data()
            images, labels = self.to_model_input(next(batches))  # uint8 batch -> augmented, normalised floats
            self.timer.data_ready()

            with self.accelerator.autocast():
                embeddings = self.model(images)
            loss, logged = self.objective(embeddings, labels, self.step)
            self.accelerator.backward(loss)  # ZeRO: DeepSpeed clips and steps (or skips) the backbone here
            grad_norm = self.clip_gradients(logged["loss"])
            self.optimizers.step_unless_nonfinite(self.flags, self.step)
            self.step += 1
            progress.update(1)

            record = self.log_record(logged, grad_norm, len(labels)) if self.log.is_due(self.step) else None
            if record is not None:
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            stopping = self.stop.agree(self.flags.stop)  # stopping: checkpoint at once (Slurm's KillWait)
            record, stopping = self.evaluate_and_save(record, stopping)
            if record is not None:
                self.log.write(record)
        progress.close()
        if stopping:
            self.accelerator.print(f"stopped by {self.stop.signal_name} at step {self.step}; checkpoint written")
        self._finish(stopping, time.perf_counter() - started)

    def clip_gradients(self, loss_value: torch.Tensor) -> torch.Tensor:
        """The global gradient norm over backbone + head shards, and clipping by it (AdaRand's means follow
        their own objective, unclipped). The head's share, the finiteness flags and the stop request travel
        in ONE all-reduce, read once (`distributed.StepFlags`)."""
        self.optimizers.unscale_()
        backbone_norm_squared = self.backend.grad_norm_squared()
        head_norm_squared = self.flags.reduce(
            loss_value, backbone_norm_squared, grad_norm_squared(self.head_params), self.stop.requested
        )
        grad_norm = (backbone_norm_squared.to(self.device) + head_norm_squared).sqrt()
        self.backend.clip_(self.head_params, grad_norm, head_norm_squared, self.cfg.optim.grad_clip)
        self.flags.read()
        return grad_norm

    def log_record(self, logged: dict, grad_norm: torch.Tensor, batch_size: int) -> dict:
        """A logging step's record: the only step that reads values on the host."""
        values = dict(zip([*logged, "grad_norm"], torch.stack([*logged.values(), grad_norm]).tolist()))
        return {
            **self.epoch_record(),
            **values,
            "lr": self.optimizers.lr(),
            **self.timer.read(batch_size * self.world),
            "memory_mb": memory_mb(self.device),
            "nonfinite_in_a_row": self.optimizers.nonfinite_in_a_row,
        }

    def epoch_record(self) -> dict:
        return {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch}

    def evaluate_and_save(self, record: dict | None, stopping: bool) -> tuple[dict | None, bool]:
        """Evaluate and checkpoint when due, at one evaluation copy of the model; a stop signal during the
        evaluation abandons it and checkpoints at once. Returns (the record to log, stopping)."""
        evaluate = not stopping and self.validator.is_due(self.step)
        if not (evaluate or self.checkpointer.is_due(self.step, stopping)):
            return record, stopping
        eval_model = self.evaluation_model()
        if evaluate:
            evaluated = self.evaluate(eval_model)
            stopping = evaluated is None
            record = {**(record or self.epoch_record()), **(evaluated or {})}
        if self.checkpointer.is_due(self.step, stopping):
            self.save(eval_model)
        return record, stopping

    def evaluation_model(self) -> torch.nn.Module:
        """A copy at the evaluation weights, BN statistics recalibrated there (ScheduleFree); training untouched."""
        cfg = self.cfg
        eval_model = copy.deepcopy(self.raw_model)
        eval_model.load_state_dict(self.backend.evaluation_state_dict(self.optimizers.average))
        # each rank's BN statistics are its own batches' (DDP broadcasts rank 0's only before a forward, ZeRO
        # never): every rank evaluates rank 0's, which the checkpoint holds
        distributed.broadcast_float_buffers(eval_model)
        if is_schedule_free(self.optimizers.backbone) and cfg.model.bn != "frozen" and cfg.eval.bn_recal_batches > 0:
            recal = make_train_loader(
                self.train_index,
                dataclasses.replace(cfg.data, num_workers=0),
                self.prep,
                self.world,
                self.rank,
                cfg.train.seed + 1,
                start_step=0,
            )
            batches = itertools.islice(recal, cfg.eval.bn_recal_batches)
            with self.accelerator.autocast():
                recalibrate_batchnorm(eval_model, (self.to_model_input(batch)[0] for batch in batches))
        return eval_model.eval()

    def evaluate(self, eval_model: torch.nn.Module | None = None) -> dict | None:
        """Validation (and eval.bins) metrics at this step (rank 0; {} elsewhere), or None when a stop signal
        came meanwhile (abandoned). Collective: every rank calls it."""
        eval_model = eval_model if eval_model is not None else self.evaluation_model()
        metrics = self.validator(
            eval_model, self.step, self.log.tensorboard, lambda: self.stop.should_stop(self.device)
        )
        if metrics:
            say(evaluation_line(self.step, metrics), self.is_main)
        return metrics

    def save(self, eval_model: torch.nn.Module | None = None) -> Path:
        """The checkpoint of this step (collective: every rank calls it); returns its directory."""
        eval_model = eval_model if eval_model is not None else self.evaluation_model()
        cfg = self.cfg
        metadata = {"facedist": json.dumps({"preprocessing": self.prep, "config": cfg.to_dict(), "step": self.step})}
        main_files = {
            checkpoint.EMBEDDING_FILE: checkpoint.save_safetensors(eval_model.state_dict(), metadata),
            "train_model.safetensors": checkpoint.save_safetensors(self.raw_model.state_dict()),
            "train_state.pt": checkpoint.save_torch(self.optimizers.state_dict()),
        }
        rank_files = {}
        for name, module, optimizer in self.sharded:
            rank_files.update(module.checkpoint_files(name, optimizer))
        rank_files.update(self.backend.checkpoint_files(self.rank))
        meta = {"world_size": self.world, "dependencies": self.dependencies}
        self.last_checkpoint = self.checkpointer.save(self.step, meta, main_files, rank_files)
        return self.last_checkpoint

    def start_line(self) -> str:
        data = self.cfg.data
        per_process = (
            str(data.batch_size) if data.sampler == "random" else f"{data.classes_per_batch} x {data.images_per_class}"
        )
        resumed_from = f"{self.resumed.directory} (step {self.step})" if self.resumed is not None else None
        return start_line(
            self.train_index.num_classes,
            self.train_index.num_samples,
            self.world,
            per_process,
            self.cfg.train.max_steps,
            self.output_dir,
            resumed_from,
        )

    def _finish(self, stopping: bool, seconds: float) -> None:
        self.log.close()
        self.accelerator.wait_for_everyone()  # before tearing down: avoids gloo's abort at exit
        best = self.log.best("val_auc")
        say(
            final_line(self.step, self.cfg.train.max_steps, seconds, best, self.last_checkpoint, stopping), self.is_main
        )
        if stopping and self.is_main:  # every rank is past its checkpoint files: the requeued job may start now
            requeue_if_slurm()
        self.accelerator.end_training()
        if distributed.is_distributed():
            torch.distributed.destroy_process_group()
        self.stop.ignore_from_now_on()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg: Config = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    Trainer(cfg, args.resume, args.force).train()
    return 0


def one_line(err: Exception) -> str:
    """The error's message. One raised in a DataLoader worker comes back with the worker's traceback in its
    message (torch's ExceptionWrapper): its last line is the message itself."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].removeprefix(f"{type(err).__module__}.{type(err).__qualname__}: ")
    return text


def cli(argv=None) -> int:
    """`facedist-train` / `python facedist/train.py`: a refused start or bad data is one line and exit 1."""
    try:
        return main(argv)
    except (ShardError, checkpoint.CheckpointError, ConfigError) as err:  # bad shards, refused resume, bad combination
        sys.exit(f"facedist train: {one_line(err)}")


if __name__ == "__main__":
    sys.exit(cli())
