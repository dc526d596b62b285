"""Checkpoints: atomic, step-exact, loadable with `weights_only=True`.

Layout of `output_dir/checkpoints/step_XXXXXXXX/` (shared file system across nodes):
  model.safetensors        evaluation weights (ScheduleFree's averaged x) + preprocessing/config metadata;
                           the only file inference, evaluation and export need
  train_model.safetensors  the weights training continues from (ScheduleFree's y)
  train_state.pt           optimizer, LR schedule, loss scaler and loop counters (tensors and plain values)
  head/                    the sharded margin head, one file of row ranges per rank (see facedist.heads)
  meta.json                written last: step, world size, what the checkpoint depends on, and the sha256 of
                           every other file, checked on resume (`--resume auto` falls back to the newest
                           checkpoint that verifies)

A checkpoint is first written as `.step_XXXXXXXX.partial` and renamed when every rank has finished, so a
process killed mid-write leaves the previous checkpoint as the latest usable one.

Rolling back: resuming from a checkpoint older than the newest starts a new line of training. The newer
checkpoints and their metrics.jsonl lines move to `checkpoints/superseded-<UTC time>/` (kept, recoverable:
move them back), so `--resume auto` and keep-last-k see only the current line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from facedist import distributed
from facedist.config import config_from_dict
from facedist.durable import fsync_directory, write_atomic

CHECKPOINTS = "checkpoints"
EMBEDDING_FILE = "model.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the run; the message says which and why."""


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (meta.json present), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def supersede_newer(output_dir: str | Path, step: int) -> Path | None:
    """Move the checkpoints after `step` to checkpoints/superseded-<UTC time>/; that folder, or None if none."""
    newer = [p for p in list_checkpoints(output_dir) if int(p.name.removeprefix("step_")) > step]
    if not newer:
        return None
    folder = Path(output_dir) / CHECKPOINTS / f"superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    folder.mkdir()
    for path in newer:
        os.replace(path, folder / path.name)
    fsync_directory(folder)
    fsync_directory(folder.parent)
    print(
        f"resume: rolled back to step {step}; moved the newer checkpoints ({', '.join(p.name for p in newer)}) "
        f"and their metrics.jsonl lines to {folder}",
        flush=True,
    )
    return folder


def supersede_log_lines(metrics_file: Path, step: int, superseded: Path | None) -> None:
    """Keep the lines of `metrics_file` up to `step`; later ones go to superseded/metrics.jsonl when given
    (a rolled-back branch), else are dropped (an interrupted run, which the resumed one repeats exactly)."""
    lines = metrics_file.read_text().splitlines()
    later = [line for line in lines if json.loads(line)["step"] > step]
    if superseded is not None and later:
        write_atomic(
            superseded / metrics_file.name, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in later))
        )
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    write_atomic(metrics_file, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint directory or a training output_dir (its latest)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        if not path.exists():
            raise CheckpointError(f"checkpoint: {path} does not exist")
        raise CheckpointError(f"checkpoint: {path} is neither a checkpoint nor an output_dir holding one")
    return latest


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_embedding_model(
    model_state: dict[str, torch.Tensor] | torch.nn.Module,
    preprocessing: dict,
    config: dict,
    path: str | Path,
    step: int | None = None,
) -> None:
    """Write evaluation weights of an EmbeddingModel as safetensors with the metadata to rebuild it."""
    state = model_state.state_dict() if isinstance(model_state, torch.nn.Module) else model_state
    meta = {"facedist": json.dumps({"preprocessing": preprocessing, "config": config, "step": step})}
    write_atomic(Path(path), lambda tmp: save_file(_contiguous(state), str(tmp), metadata=meta))


def read_embedding_metadata(path: str | Path) -> dict:
    """The metadata save_embedding_model stored: preprocessing, config, step."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("facedist")
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise CheckpointError(f"checkpoint: {path} is not a safetensors file ({err})") from err
    if raw is None:
        raise CheckpointError(f"checkpoint: {path} has no facedist metadata (not written by facedist)")
    return json.loads(raw)


def load_embedding_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, preprocessing, checkpoint_dir) from a checkpoint, output_dir or model.safetensors."""
    from safetensors.torch import load_file

    from facedist.model import build_model

    path = Path(path)
    file = path if path.is_file() else resolve_checkpoint(path) / EMBEDDING_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint: {file} is missing")
    meta = read_embedding_metadata(file)
    model_cfg = config_from_dict(meta["config"]).model
    model_cfg.pretrained, model_cfg.compile = None, False
    if model_cfg.bn == "sync":
        model_cfg.bn = "batch"  # inference runs anywhere; statistics are the same buffers
    model = build_model(model_cfg, "cpu")
    try:
        model.load_state_dict(load_file(str(file)))
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint: {file} does not fit {model_cfg.backbone}: {str(err)[:200]}") from err
    return model.to(device).eval(), meta["preprocessing"], file.parent


def init_weights_from(model: torch.nn.Module, source: str | Path) -> str:
    """Fine-tuning start (`model.init_from`): a run's latest checkpoint, a checkpoint or its model.safetensors
    give the whole embedding model at its evaluation weights; any other file (e.g. InsightFace's
    backbone.pth) gives the backbone, as model.pretrained. Returns what was loaded, for the log."""
    from safetensors.torch import load_file

    from facedist.model import load_backbone_weights

    path = Path(source)
    if path.is_dir():
        path = resolve_checkpoint(path) / EMBEDDING_FILE
    if path.suffix == ".safetensors" and path.is_file():
        try:
            read_embedding_metadata(path)
        except CheckpointError:  # safetensors without facedist metadata: backbone weights
            pass
        else:
            try:
                model.load_state_dict(load_file(str(path)))
            except RuntimeError as err:
                raise CheckpointError(
                    f"model.init_from: {path} does not fit this model: {str(err).splitlines()[0][:200]}"
                ) from err
            return f"the embedding model of {path}"
    try:
        load_backbone_weights(model.backbone, path)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(str(err).replace("model.pretrained", "model.init_from", 1)) from err
    return f"the backbone weights in {path}"


def dependencies(cfg, num_classes: int, data_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint's tensors depend on; resuming with any of these changed is refused unless forced."""
    return {
        "model.backbone": cfg.model.backbone,
        "model.embedding_dim": cfg.model.embedding_dim,
        "loss.head": cfg.loss.head,
        "head classes": num_classes if cfg.loss.head != "none" else 0,
        "loss.adarand": cfg.loss.adarand,
        "optim.name": cfg.optim.name,
        "training data": data_fingerprint,
        # recorded only when not the default, so older checkpoints still resume: the average resumes from the
        # checkpoint's evaluation weights; the GDC neck has its own tensors
        **({"optim.ema_decay": cfg.optim.ema_decay} if cfg.optim.ema_decay > 0 else {}),
        **({"model.neck": cfg.model.neck} if cfg.model.neck != "pool" else {}),
    }


def check_compatible(checkpoint: Path, expected: dict[str, Any], force: bool) -> dict:
    """Read meta.json and refuse (one line) when a dependency changed, unless `force`."""
    meta = json.loads((checkpoint / META_FILE).read_text())
    changed = [
        f"{k}: {meta['dependencies'].get(k)!r} -> {v!r}"
        for k, v in expected.items()
        if meta["dependencies"].get(k) != v
    ]
    if changed and not force:
        raise CheckpointError(
            f"resume: {checkpoint} was trained with a different {'; '.join(changed)} (pass --force to resume anyway "
            "when every tensor keeps its shape; --force cannot make shapes fit)"
        )
    return meta


class CheckpointWriter:
    """Collective save: every rank calls `save`; rank 0 owns the directory, each rank writes its own files.

    `is_due(step, stopping)`: every `every` steps (0: never), at `last_step`, and when the run is stopping."""

    def __init__(
        self, output_dir: str | Path, keep: int, rank: int, barrier, every: int = 0, last_step: int | None = None
    ):
        self.output_dir, self.keep, self.rank, self.barrier = Path(output_dir), keep, rank, barrier
        self.every, self.last_step = every, last_step

    def is_due(self, step: int, stopping: bool = False) -> bool:
        return stopping or step == self.last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, meta: dict, main_files: dict[str, Any], rank_files: dict[str, Any]) -> Path:
        """`main_files` (written by rank 0) and `rank_files` (by every rank) map file names to writers
        `fn(path)`. Returns the final checkpoint directory."""
        final = step_dir(self.output_dir, step)
        partial = final.with_name(f".{final.name}.partial")
        if self.rank == 0:
            for stale in list(final.parent.glob(".step_*.partial")) + ([final] if final.exists() else []):
                shutil.rmtree(stale)
            partial.mkdir(parents=True)
        self.barrier()
        for name, write in {**(main_files if self.rank == 0 else {}), **rank_files}.items():
            target = partial / name
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, write)
        self.barrier()
        if self.rank == 0:  # every rank's files are complete: one place records them all
            meta = {"format_version": FORMAT_VERSION, "step": step, **meta, "sha256": checksums(partial)}
            write_atomic(partial / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
            os.replace(partial, final)
            fsync_directory(final.parent)
            for old in list_checkpoints(self.output_dir)[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old)
        self.barrier()
        return final


def save_torch(obj: Any):
    """A writer for CheckpointWriter that torch.saves plain containers of tensors and numbers."""
    return lambda tmp: torch.save(obj, tmp)


def save_safetensors(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    contiguous = _contiguous(state)
    return lambda tmp: save_file(contiguous, str(tmp), metadata=metadata)


def load_torch(path: Path) -> Any:
    """Files facedist wrote itself hold only tensors and plain values: weights_only loading suffices."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint: {path} is missing") from err
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint: {path} cannot be read ({str(err).splitlines()[0][:200]})") from None


def checksums(directory: Path) -> dict[str, str]:
    """{path relative to `directory`: sha256} of every file below it."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    digests = {}
    for path in files:
        with open(path, "rb") as f:
            digests[path.relative_to(directory).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def damaged_file(checkpoint: Path) -> str | None:
    """The first file of `checkpoint` that is missing or does not match meta.json's sha256, with why; None
    when all match (or meta.json predates checksums)."""
    try:
        recorded = json.loads((checkpoint / META_FILE).read_text()).get("sha256", {})
    except (OSError, ValueError) as err:
        return f"{checkpoint / META_FILE} cannot be read ({err})"
    for name, digest in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                return f"{path} does not match its sha256 in meta.json (damaged)"
    return None


def verified_checkpoint(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint `--resume` names, its files checked against meta.json: for "auto" the newest of output_dir
    that verifies (one line names each damaged one it passes over), else the one given, refused when damaged."""
    if resume != "auto":
        directory = resolve_checkpoint(resume)
        problem = damaged_file(directory)
        if problem is not None:
            raise CheckpointError(f"resume: {problem}; resume from an older checkpoint of {directory.parent}")
        return directory
    candidates, damaged = list_checkpoints(output_dir)[::-1], []
    for directory in candidates:
        problem = damaged_file(directory)
        if problem is None:
            for skipped in damaged:
                print(f"resume: {skipped}; resuming from {directory} instead", flush=True)
            return directory
        damaged.append(problem)
    if candidates:
        raise CheckpointError(f"resume: no checkpoint in {Path(output_dir) / CHECKPOINTS} verifies: {damaged[0]}")
    return None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint: {path} is missing") from err
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"checkpoint: {path} cannot be read ({str(err).splitlines()[0][:200]})") from None


def load_fitting(module: torch.nn.Module, path: Path) -> None:
    """`module.load_state_dict` from a safetensors file, refused in one line when a tensor's shape differs."""
    state = _load_safetensors(path)
    own = module.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise CheckpointError(
                f"resume: {path} holds {name} of shape {list(tensor.shape)}, this model's is {list(own[name].shape)} "
                "(--force cannot make shapes fit: start a new run, or model.init_from for the weights that fit)"
            )
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # missing or unexpected keys
        raise CheckpointError(f"resume: {path} does not fit this model: {str(err).splitlines()[0][:200]}") from None


def writable_output(output_dir: Path) -> str | None:
    """Create output_dir and its checkpoints/ folder and prove both writable with a test file; None, or why not."""
    for folder in (output_dir, output_dir / CHECKPOINTS):
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"facedist")
            probe.unlink()
        except OSError as err:
            return f"output_dir: cannot write to {folder} ({err.strerror or err})"
    return None


@dataclasses.dataclass
class ResumeState:
    """Where a resumed run continues: the checkpoint, its step and meta.json, and train_state.pt's contents
    (optimizer, LR schedule, loss scaler)."""

    directory: Path
    step: int
    meta: dict
    train_state: dict

    def load_training_weights(self, model: torch.nn.Module) -> None:
        """The weights training continues from (ScheduleFree's y)."""
        load_fitting(model, self.directory / "train_model.safetensors")

    def load_evaluation_weights(self, model: torch.nn.Module) -> None:
        """The exported weights (the moving average, when the run keeps one)."""
        load_fitting(model, self.directory / EMBEDDING_FILE)

    def supersede_newer(self, output_dir: str | Path) -> Path | None:
        """Main process, once everything is loaded: a roll-back to an older checkpoint starts a new line of
        training, so output_dir's newer checkpoints (and their log lines) move aside; where they went, or None."""
        return supersede_newer(output_dir, self.step)


def find_resume(
    resume: str | None, output_dir: str | Path, expected: dict[str, Any], force: bool, check=None
) -> ResumeState | None:
    """`--resume auto` (the newest checkpoint in output_dir that verifies; None when there is none yet) or
    `--resume PATH`, refused (one line) when damaged, when what the run depends on changed (`dependencies`,
    unless `force`) or when `check(directory, meta)` refuses it (the backend's own conditions)."""
    if not resume:
        return None
    try:  # the main process reads the files once; every rank gets its answer
        found = verified_checkpoint(resume, output_dir) if distributed.rank() == 0 else None
    except CheckpointError as err:
        found = err
    found = distributed.broadcast_object(found)
    if isinstance(found, CheckpointError):
        raise found
    if found is None:
        return None
    directory = found
    meta = check_compatible(directory, expected, force)
    if check is not None:
        check(directory, meta)
    return ResumeState(directory, meta["step"], meta, load_torch(directory / "train_state.pt"))
