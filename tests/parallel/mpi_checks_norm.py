"""BatchNorm across ranks, in real MPI jobs of 1-4 ranks: SyncBatchNorm equals torch's
BatchNorm on the global batch (uneven local batches, a rank with one sample); a group-
parallel ResNeXt bottleneck (column-parallel 1x1 -> sharded BN -> group-parallel 3x3 ->
sharded BN -> row-parallel 1x1, plus the residual) equals the serial block in forward,
backward and SGD steps; sharded BatchNorm state gathers and scatters."""

from __future__ import annotations

import numpy as np
from mpi_harness import check

import mconv
import parallel
from mconv import nn, optim


def _batches(comm, seed, channels=3, size=(4, 3)):
    """Every rank's batch (rank r holds r + 1 samples), the same arrays on every rank."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((r + 1, channels, *size)) * 2 + 1 for r in range(comm.size)]


@check()
def sync_batch_norm_equals_batch_norm_on_the_global_batch(comm, t):
    import torch

    theirs = torch.nn.BatchNorm2d(3, momentum=0.3).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    ours = parallel.SyncBatchNorm(3, comm, momentum=0.3, dtype="float64")
    ours.load_state_dict({k: v.numpy().copy() for k, v in theirs.state_dict().items()})
    for step in range(2):
        xs, dys = _batches(comm, 10 + step), _batches(comm, 20 + step)
        tx = torch.tensor(np.concatenate(xs), requires_grad=True)
        ty = theirs(tx)
        ty.backward(torch.tensor(np.concatenate(dys)))
        start = sum(len(x) for x in xs[: comm.rank])
        mine = slice(start, start + len(xs[comm.rank]))
        y = ours(xs[comm.rank])
        dx = ours.backward(dys[comm.rank])
        t.close(y, ty.detach().numpy()[mine], f"step {step}: y", 1e-10)
        t.close(dx, tx.grad.numpy()[mine], f"step {step}: dx", 1e-10)
        for name in ("weight", "bias"):  # this rank's contribution; summed, torch's gradient
            total = comm.allreduce(getattr(ours, name).grad, "sum")
            t.close(total, getattr(theirs, name).grad.numpy(), f"step {step}: {name}.grad", 1e-10)
        for key, value in theirs.state_dict().items():
            t.close(ours.state_dict()[key], value.numpy(), f"step {step}: {key}", 1e-12)
        ours.zero_grad(), theirs.zero_grad()
    ours.eval(), theirs.eval()
    x = _batches(comm, 30)[comm.rank]
    t.close(ours(x), theirs(torch.tensor(x)).detach().numpy(), "eval: y", 1e-12)


def _bottleneck(comm=None, channels=8, width=24, groups=12):
    """The serial block, or (comm given) the group-parallel one; the same seed draws the
    same weights, so the shards are slices of the serial layers."""
    mconv.manual_seed(0)
    kw = dict(dtype="float64")
    if comm is None:
        body = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False, **kw), nn.BatchNorm2d(width, **kw),
            nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False, **kw),
            nn.BatchNorm2d(width, **kw), nn.ReLU(), nn.Conv2d(width, channels, 1, **kw),
        )  # fmt: skip
    else:
        body = nn.Sequential(
            parallel.ColumnParallelConv2d(channels, width, 1, bias=False, comm=comm,
                                          gather_output=False, **kw),
            parallel.ShardedBatchNorm2d(width, comm=comm, **kw),
            nn.ReLU(),
            parallel.GroupParallelConv2d(width, width, 3, padding=1, groups=groups, bias=False,
                                         comm=comm, input_is_sharded=True, gather_output=False,
                                         **kw),
            parallel.ShardedBatchNorm2d(width, comm=comm, **kw),
            nn.ReLU(),
            parallel.RowParallelConv2d(width, channels, 1, comm=comm, input_is_sharded=True, **kw),
        )  # fmt: skip
    return nn.Residual(body)


@check()
def group_parallel_bottleneck_equals_the_serial_block(comm, t):
    serial, block = _bottleneck(), _bottleneck(comm)
    full = parallel.gather_state_dict(block, comm, root=None)
    for key, value in serial.state_dict().items():
        t.close(full[key], value, f"initial {key}", 0)
    opts = [optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (serial, block)]
    rng = np.random.default_rng(1)
    for step in range(3):
        x = rng.standard_normal((3, 8, 5, 5))
        dy = rng.standard_normal(x.shape)
        outs = [m(x) for m in (serial, block)]
        t.close(outs[1], outs[0], f"step {step}: y", 1e-11)
        dxs = [m.backward(dy) for m in (serial, block)]
        t.close(dxs[1], dxs[0], f"step {step}: dx", 1e-11)
        for opt in opts:
            opt.step(), opt.zero_grad()
    full = parallel.gather_state_dict(block, comm, root=None)
    for key, value in serial.state_dict().items():  # weights and BatchNorm statistics
        t.close(full[key], value, f"after 3 SGD steps: {key}", 1e-10)
    fresh = _bottleneck(comm)  # and back: the serial state scattered into a fresh block
    parallel.scatter_state_dict(fresh, serial.state_dict(), comm)
    x = rng.standard_normal((2, 8, 5, 5))
    serial.eval(), fresh.eval()
    t.close(fresh(x), serial(x), "scattered state: eval output", 1e-11)
