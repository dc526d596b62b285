"""Small torch.distributed helpers that fall back to single-process behaviour without a process group.

`gather_rows` takes any row counts (evaluation: ranks may hold different or zero rows) and pays for it
with a count exchange and host reads; the training step, where every rank holds the same P x M rows, uses
`gather_fixed` / `GatherFixed` (one `all_gather_single`, no host read; backward: one reduce-scatter)
and reads its step's flags once through `StepFlags`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`sum`, `max`, `mean`); the tensor itself without a process group."""
    if is_distributed():
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}[op]
        dist.all_reduce(tensor, op=reduce_op)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is true on at least one (all ranks must call it)."""
    return bool(all_reduce(torch.tensor([float(flag)], device=device), "max").item())


def broadcast_object(value, src: int = 0):
    """Rank `src`'s `value` (any picklable object) on every rank; for decisions taken once, at start."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]


def broadcast_float_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every rank's floating-point buffers (BatchNorm statistics) with rank `src`'s, in one broadcast."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not is_distributed() or not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1) for b in buffers])
    dist.broadcast(flat, src)
    for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(part.view_as(b))


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate (no grad) every rank's rows in rank order; row counts may differ between ranks."""
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)])


def gather_fixed(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate (no grad) every rank's rows in rank order; every rank must hold the same shape."""
    if not is_distributed():
        return tensor
    out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_single(out, tensor.contiguous())
    return out


class GatherFixed(torch.autograd.Function):
    """`gather_fixed` with a gradient: backward reduce-scatters the global rows' gradient (sums what every
    rank computed for them) and hands rank r its own rows, times `grad_scale`."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.grad_scale = grad_scale
        return gather_fixed(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        own = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        dist.reduce_scatter_single(own, grad)
        return own * ctx.grad_scale, None


def gather_step_batch(rows: torch.Tensor, labels: torch.Tensor, grad_scale: float):
    """(global rows [N, ...] with the gradient of `GatherFixed`, global labels [N], this rank's slice) for
    the training step, where every rank holds the same number of rows: two all-gathers, no host read."""
    count, index = rows.shape[0], rank()
    own = slice(index * count, (index + 1) * count)
    if world_size() == 1:
        return rows, labels, own
    return GatherFixed.apply(rows, grad_scale), gather_fixed(labels), own


class SumOverRanks(torch.autograd.Function):
    """All-reduce sum with an identity backward: every rank computes the same function of the sum, so the
    gradient of its own contribution is the gradient of the sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce(tensor.clone(), "sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


class StepFlags:
    """What every rank must agree on before `optimizer.step`, in ONE all-reduce and ONE host read.

    ScheduleFree keeps step counters as Python numbers, so a bad step must be refused before it is taken,
    not detected a step later. `reduce(loss, head_norm_squared, stop)` sums, over ranks: the squared
    gradient norm of this rank's head shard (so the global norm for clipping needs no further collective),
    a non-finite-loss flag, a non-finite-gradient flag (from the local norms) and the stop request; it
    returns the global head norm squared, still on the device. `read()` then copies the flags to the host.
    """

    def __init__(self, device: torch.device | str):
        self.device = device
        self.loss_bad = self.grad_bad = self.stop = False

    def reduce(
        self, loss: torch.Tensor, replicated_norm_squared: torch.Tensor, head_norm_squared: torch.Tensor, stop: bool
    ) -> torch.Tensor:
        bad_grad = ~torch.isfinite(replicated_norm_squared.to(self.device) + head_norm_squared.to(self.device))
        packed = torch.stack(
            [
                head_norm_squared.to(self.device, torch.float32),
                (~torch.isfinite(loss.detach())).to(self.device, torch.float32),
                bad_grad.float(),
                torch.full((), float(stop), device=self.device),
            ]
        )
        self._packed = all_reduce(packed, "sum")
        return self._packed[0]

    def read(self) -> None:
        """The one device->host read of the step: sets `loss_bad`, `grad_bad` and `stop` (same on every rank)."""
        loss_bad, grad_bad, stop = self._packed[1:].tolist()
        self.loss_bad, self.grad_bad, self.stop = loss_bad > 0, grad_bad > 0, stop > 0
