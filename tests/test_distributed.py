"""The fixed-size training gather (forward, reduce-scatter backward) and the step's fused flags, on 3 gloo processes."""

import math
import warnings

import pytest
import torch
from dist_utils import run_distributed

from facedist import distributed

ROWS, DIM = 4, 3


def _gather_and_flags(rank, world):
    local = torch.arange(ROWS * DIM, dtype=torch.float64).view(ROWS, DIM).add(100 * rank).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated collective (every rank would print it)
        gathered = distributed.GatherFixed.apply(local, 2.0)
    weights = torch.arange(world * ROWS * DIM, dtype=torch.float64).view(world * ROWS, DIM) * (rank + 1)
    (gathered * weights).sum().backward()  # each rank its own function of the global rows
    labels = distributed.gather_fixed(torch.full((ROWS,), rank))
    _, _, own = distributed.gather_step_batch(local.detach(), labels[:ROWS], 1.0)

    flags = distributed.StepFlags("cpu")
    loss = torch.tensor(math.nan if rank == 1 else 1.0)
    head_sum = flags.reduce(loss, torch.tensor(4.0), torch.tensor(float(rank + 1)), stop=rank == 2)
    flags.read()
    return (
        gathered.detach(),
        distributed.gather_rows(local.detach()),
        local.grad,
        weights,
        labels,
        own,
        head_sum,
        flags.loss_bad,
        flags.grad_bad,
        flags.stop,
    )


@pytest.mark.distributed
def test_fixed_gather_and_fused_flags():
    world = 3
    results = run_distributed(_gather_and_flags, world)
    weight_sum = sum(r[3] for r in results)
    for rank, (gathered, variable, grad, _, labels, own, head_sum, loss_bad, grad_bad, stop) in enumerate(results):
        assert torch.equal(gathered, variable)  # same rows, same order as the variable-length gather
        # backward: the sum over ranks of their gradients of the global rows, own slice, times the scale
        torch.testing.assert_close(grad, 2.0 * weight_sum[rank * ROWS : (rank + 1) * ROWS])
        assert torch.equal(labels, torch.arange(world).repeat_interleave(ROWS)) and own == slice(
            rank * ROWS, (rank + 1) * ROWS
        )
        # one rank's non-finite loss and another's stop request reach every rank; head norms are summed
        assert head_sum.item() == 6.0 and (loss_bad, grad_bad, stop) == (True, False, True)


def test_flags_without_a_process_group():
    flags = distributed.StepFlags("cpu")
    assert flags.reduce(torch.tensor(1.0), torch.tensor(math.inf), torch.tensor(2.0), stop=False).item() == 2.0
    flags.read()
    assert (flags.loss_bad, flags.grad_bad, flags.stop) == (False, True, False)
    rows = torch.ones(2, 3)
    assert distributed.gather_fixed(rows) is rows
