"""Count, per training step and rank, what a GPU would wait on: device->host syncs and torch.distributed collectives.

    python -m torch.distributed.run --nproc_per_node W tests/count_syncs.py OUT_DIR COMMON_ARGS... \
        -- NAME ARGS... [-- NAME ARGS...]

Runs facedist/train.py once per NAME (common args, then that run's args; one process group for all) with:
- `SyncCounter`, a TorchDispatchMode that counts the aten ops that need a value on the host: `.item()`
  (`_local_scalar_dense`), `nonzero` (also what `torch.where(mask)` calls), `masked_select`, `unique`,
  boolean-mask indexing (`index` / `index_put` with a bool index: the nonzero runs inside the kernel, so the
  mode sees the indexing op), `bincount`, `repeat_interleave` without an output size, `equal`,
  `is_nonzero`, device -> CPU copies. Host-side step counters of torch.optim (CPU tensors read with `.item()`
  in `step`) are not device syncs and are excluded by identity;
- every torch.distributed collective wrapped and counted (outermost call only; DDP's gradient buckets
  run in C++ and are not seen);
- step boundaries at each `next()` on the training loader, whose own CPU work is not counted.
Each rank writes OUT_DIR/NAME_rank_R.json: a list, per step, of {"syncs": {op: n}, "collectives": {name: n}}.
`Tensor.tolist()` / `.numpy()` read CPU tensors without going through the dispatcher: they are wrapped
and counted too.
On CUDA it also sets torch.cuda.set_sync_debug_mode("warn"), so CUDA itself reports every sync.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ALWAYS_SYNC = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.bincount.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.repeat_interleave.Tensor,
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "gather",
    "scatter",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
)


def _is_sync(func, args, kwargs) -> bool:
    if func in ALWAYS_SYNC:
        return not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None)
    if func in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    if func in (aten._to_copy.default, aten.copy_.default):
        source = args[0] if func is aten._to_copy.default else args[1]
        target = kwargs.get("device") if func is aten._to_copy.default else args[0].device
        return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    return False


class SyncCounter(TorchDispatchMode):
    """Counts would-be device->host syncs by op name into `self.counts`; `exclude` holds data pointers of
    tensors whose reads are host-side bookkeeping (torch.optim step counters)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.exclude: set[int] = set()
        self.paused = False
        self._saved = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            self._saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _counted(self, name, method):
        def counted(tensor, *args, **kwargs):
            if not self.paused:
                self.counts[name] += 1
            return method(tensor, *args, **kwargs)

        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and _is_sync(func, args, kwargs):
            excluded = func is aten._local_scalar_dense.default and args[0].data_ptr() in self.exclude
            if not excluded:
                self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)


class CollectiveCounter:
    """Wraps torch.distributed's collectives; counts outermost calls by name into `self.counts`."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._depth = 0
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.counts[name] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


def _exclude_optimizer_step_counters(counter: SyncCounter) -> None:
    def hook(optimizer, args, kwargs):
        for state in optimizer.state.values():
            step = state.get("step") if isinstance(state, dict) else None
            if torch.is_tensor(step) and step.device.type == "cpu":
                counter.exclude.add(step.data_ptr())

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(hook)


def main(out_dir: Path, common: list[str], runs: dict[str, list[str]]) -> None:
    import facedist.data.dataset as dataset

    syncs, collectives, steps = SyncCounter(), CollectiveCounter(), []
    _exclude_optimizer_step_counters(syncs)
    make_train_loader = dataset.make_train_loader

    def close_step():
        if steps:
            steps[-1] = {"syncs": dict(syncs.counts), "collectives": dict(collectives.counts)}
        syncs.counts.clear()
        collectives.counts.clear()

    class CountedLoader:  # the first training loader of a run marks the step boundaries
        def __init__(self, loader):
            self.loader, self.batch_sampler, self.dataset = loader, loader.batch_sampler, loader.dataset

        def __iter__(self):
            batches = iter(self.loader)
            while True:
                syncs.paused = True  # the loader's own CPU work (num_workers=0) is not the step's
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    syncs.paused = False
                close_step()
                steps.append(None)
                yield batch

    loaders = []

    def counted_make_train_loader(*args, **kwargs):
        loader = make_train_loader(*args, **kwargs)
        loaders.append(loader)
        return CountedLoader(loader) if len(loaders) == 1 else loader

    dataset.make_train_loader = counted_make_train_loader
    destroy_process_group = dist.destroy_process_group
    dist.destroy_process_group = lambda *a, **k: None  # one process group for all runs; destroyed at the end
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    train = str(Path(__file__).resolve().parent.parent / "facedist" / "train.py")
    rank = int(os.environ.get("RANK", "0"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, args in runs.items():
        sys.argv = [train, *common, *args]
        steps.clear()
        loaders.clear()
        try:
            with syncs:
                runpy.run_path(train, run_name="__main__")
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
        close_step()
        (out_dir / f"{name}_rank_{rank}.json").write_text(json.dumps(steps))
    if dist.is_initialized():
        dist.barrier()
        destroy_process_group()


def _parse(argv: list[str]) -> tuple[Path, list[str], dict[str, list[str]]]:
    groups, current = [], []
    for arg in argv[1:]:
        if arg == "--":
            groups.append(current)
            current = []
        else:
            current.append(arg)
    groups.append(current)
    return Path(argv[0]), groups[0], {group[0]: group[1:] for group in groups[1:]}


if __name__ == "__main__":
    main(*_parse(sys.argv[1:]))
