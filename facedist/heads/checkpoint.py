"""Row-range checkpoints of sharded heads: each rank writes its own rows, any world size reads them back.

A row-sharded module (the margin head, AdaRand's class means) holds rows [row_start, row_stop) of
num_rows. Its tensors with a leading row dimension (parameters, buffers, per-row optimizer state such as
Adam moments or per-row step counts) are saved as that row range, one safetensors file per rank; 0-d
tensors (AdaCos' scale, global step counters) and the optimizer's scalar hyper-parameters are replicated.
Loading reads, from every file whose range overlaps the loader's own, only the overlapping rows
(safetensors slices lazily), so no rank ever holds the whole matrix: 2 -> 1, 1 -> 3, 3 -> 2 all work.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from facedist.checkpoint import CheckpointError, save_safetensors

FILE_PATTERN = "rank_{rank:05d}.safetensors"
_ROW, _REPLICATED, _OPTIMIZER = "rows.", "replicated.", "optimizer."  # key prefixes in the files


class RowShardedModule(nn.Module):
    """A module owning rows [row_start, row_stop) of num_rows; saves and loads them as row ranges."""

    num_rows: int
    row_start: int
    row_stop: int
    rank: int

    def checkpoint_files(self, folder: str, optimizer: torch.optim.Optimizer | None) -> dict:
        """{relative file name: writer(path)} of this rank's rows, for facedist.checkpoint.CheckpointWriter."""
        tensors, meta = {}, {"num_rows": self.num_rows, "row_start": self.row_start, "row_stop": self.row_stop}
        for name, value in self.state_dict().items():
            tensors[_key(name, value, self.row_stop - self.row_start)] = value
        if optimizer is not None:
            (param,) = _single_param(optimizer)
            for name, value in optimizer.state.get(param, {}).items():
                tensors[_key(_OPTIMIZER + name, value, self.row_stop - self.row_start)] = value
            group = optimizer.param_groups[0]
            meta["optimizer"] = type(optimizer).__name__
            meta["param_group"] = {k: v for k, v in group.items() if isinstance(v, (bool, int, float))}
        name = f"{folder}/{FILE_PATTERN.format(rank=self.rank)}"
        return {name: save_safetensors(tensors, {"facedist_rows": json.dumps(meta)})}

    def load_checkpoint(self, folder: str | Path, optimizer: torch.optim.Optimizer | None) -> None:
        """Load this rank's rows (and optimizer state) from the row-range files in `folder`, any world size."""
        files = _read_layout(Path(folder), self.num_rows)
        tensors = _read_rows(files, self.row_start, self.row_stop)
        module_state = {k: v for k, v in tensors.items() if not k.startswith(_OPTIMIZER)}
        try:
            self.load_state_dict(module_state)
        except RuntimeError as err:  # e.g. another embedding dimension
            raise CheckpointError(
                f"checkpoint: {folder} does not fit this head: {str(err).splitlines()[-1].strip()}"
            ) from None
        if optimizer is None:
            return
        meta = files[0][1]
        if meta.get("optimizer") != type(optimizer).__name__:
            raise CheckpointError(
                f"checkpoint: {folder} holds {meta.get('optimizer')} state for the head, "
                f"the run uses {type(optimizer).__name__}"
            )
        state = {k.removeprefix(_OPTIMIZER): v for k, v in tensors.items() if k.startswith(_OPTIMIZER)}
        group = {**{k: v for k, v in optimizer.param_groups[0].items() if k != "params"}, **meta["param_group"]}
        optimizer.load_state_dict({"state": {0: state} if state else {}, "param_groups": [{**group, "params": [0]}]})


def _single_param(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != 1:
        raise ValueError(f"row-range checkpoints expect an optimizer over one row-sharded tensor, got {len(params)}")
    return params


def _key(name: str, value: torch.Tensor, local_rows: int) -> str:
    if value.dim() == 0:
        return _REPLICATED + name
    if value.shape[0] != local_rows:
        raise ValueError(f"{name}: shape {tuple(value.shape)} has no leading row dimension of {local_rows}")
    return _ROW + name


def _read_layout(folder: Path, num_rows: int) -> list[tuple[Path, dict]]:
    """(file, metadata) of every rank file, by row range; checks they tile [0, num_rows) exactly."""
    files = []
    for path in sorted(folder.glob(FILE_PATTERN.replace("{rank:05d}", "*"))):
        with safe_open(str(path), framework="pt") as f:
            files.append((path, json.loads((f.metadata() or {})["facedist_rows"])))
    if not files:
        raise CheckpointError(f"checkpoint: no head row files ({FILE_PATTERN.format(rank=0)}, ...) in {folder}")
    files.sort(key=lambda item: item[1]["row_start"])
    if files[0][1]["num_rows"] != num_rows:
        raise CheckpointError(
            f"checkpoint: {folder} holds a head of {files[0][1]['num_rows']} classes, the run has {num_rows}"
        )
    stops = [0] + [meta["row_stop"] for _, meta in files]
    if [meta["row_start"] for _, meta in files] != stops[:-1] or stops[-1] != num_rows:
        raise CheckpointError(
            f"checkpoint: the row ranges in {folder} do not cover 0..{num_rows} exactly (a rank's file is missing)"
        )
    return files


def _read_rows(files: list[tuple[Path, dict]], start: int, stop: int) -> dict[str, torch.Tensor]:
    """{name: rows [start, stop)} of every row tensor, read from the files that overlap, and {name: value}
    of the replicated ones (identical in every file)."""
    parts: dict[str, list[torch.Tensor]] = {}
    replicated: dict[str, torch.Tensor] = {}
    for path, meta in files:
        lo, hi, offset = max(start, meta["row_start"]), min(stop, meta["row_stop"]), meta["row_start"]
        if hi <= lo:
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                kind, name = key[: key.index(".") + 1], key[key.index(".") + 1 :]
                if kind == _REPLICATED:
                    replicated.setdefault(name, f.get_tensor(key))
                else:
                    parts.setdefault(name, []).append(f.get_slice(key)[lo - offset : hi - offset])
    return {**{name: torch.cat(chunks) for name, chunks in parts.items()}, **replicated}
