"""Channel-parallel dense convolutions (groups=1), Megatron-style.

Column-parallel splits the output channels: rank r holds weight rows
``[r*O/P, (r+1)*O/P)`` (and that block of the bias) and computes its block
of y from the full input. Row-parallel splits the input channels: rank r
holds weight columns ``[r*C/P, (r+1)*C/P)`` and computes a partial y from
its block of x; the partial outputs are summed, then the (replicated) bias
is added::

    Column  y[:, block r] = conv(x, W[block r, :]) + b[block r]
    Row     y             = sum_r conv(x[:, block r], W[:, block r]) + b

Communication (all of it):

    layer   forward                            backward
    Column  none; gather_output: allgather y   allreduce(sum) of the partial dx
    Row     allreduce(sum) of the partial y    none; full input: allgather dx

The backward passes are the exact adjoints: the transpose of "replicate x
to every rank" is "sum the ranks' dx", the transpose of "sum the partial
outputs" is "give dy to every rank". A column-parallel layer with
``gather_output=False`` feeds a row-parallel one with
``input_is_sharded=True`` with no communication between them (the
two-layer Megatron block costs one allreduce forward and one backward).

fp16: the row-parallel partial sums are computed, summed and biased in
fp32 and rounded once, as the serial layer does.

>>> import numpy as np, mconv, parallel
>>> comm = parallel.init()
>>> mconv.manual_seed(0)
>>> up = parallel.ColumnParallelConv2d(3, 12, 3, padding=1, comm=comm, gather_output=False)
>>> down = parallel.RowParallelConv2d(12, 3, 1, comm=comm, input_is_sharded=True)
>>> y = down(up(np.ones((2, 3, 6, 6), dtype=np.float32)))
>>> y.shape, up.backward(down.backward(np.ones_like(y))).shape
((2, 3, 6, 6), (2, 3, 6, 6))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mconv import functional as F
from mconv import nn

from .sharded import ShardedConv


class _DenseSharded(ShardedConv):
    def _check_split(self, full) -> None:
        if full.groups != 1:
            raise ValueError(
                f"{type(self).__name__} splits dense convs (groups=1); use GroupParallelConv for "
                f"grouped convs, but got groups={full.groups}"
            )


class _ColumnParallelConv(_DenseSharded):
    """Arguments: those of the serial ``nn.Conv*d`` plus keyword-only ``comm`` and
    ``gather_output=True``. Input: always the full input."""

    shard_axes = {"weight": 0, "bias": 0}

    def __init__(self, *args: Any, comm: Any, gather_output: bool = True, **kwargs: Any):
        super().__init__(*args, comm=comm, flags={"gather_output": gather_output}, **kwargs)

    def _check_split(self, full) -> None:
        super()._check_split(full)
        self._divisible(full.out_channels, "out_channels", "its output channels")

    def forward(self, x):
        axis = self._channel_axis(x)
        self._check_channels(x, axis, self.in_channels, "the full input")
        y_local = self._conv(x, None if self.bias is None else self.bias.data)
        self._cache = (x, axis, y_local.shape)
        return self._output(y_local, axis)

    def backward(self, grad_output):
        """The full dx (partial dx summed over ranks); accumulates grads."""
        x, axis, local_shape = self._cached()
        dy = self._local_grad(grad_output, local_shape, axis, x.dtype)
        dx = self._conv_backward(dy, x, self.bias is not None)
        return self.comm.allreduce(dx, "sum", out=dx)


class _RowParallelConv(_DenseSharded):
    """Arguments: those of the serial ``nn.Conv*d`` plus keyword-only ``comm`` and
    ``input_is_sharded=False``. Output: always the full output."""

    shard_axes = {"weight": 1, "bias": None}

    def __init__(self, *args: Any, comm: Any, input_is_sharded: bool = False, **kwargs: Any):
        super().__init__(*args, comm=comm, flags={"input_is_sharded": input_is_sharded}, **kwargs)
        if self.bias is not None:  # replicated: every rank starts from rank 0's
            self.comm.broadcast_into(self.bias.data, root=0)

    def _check_split(self, full) -> None:
        super()._check_split(full)
        self._divisible(full.in_channels, "in_channels", "its input channels")

    def forward(self, x):
        x_local, axis = self._local_input(x)
        if x.dtype == np.float16:  # partial sums, their sum and the bias in fp32; round once
            partial = F.conv(
                x_local.astype(np.float32),
                self.weight.data.astype(np.float32),
                None,
                **self._options,
            )
        else:
            partial = self._conv(x_local, None)
        y = self.comm.allreduce(partial, "sum", out=partial)
        if self.bias is not None:
            shape = [1] * y.ndim
            shape[axis] = -1
            y += self.bias.data.astype(y.dtype).reshape(shape)  # (1, O, 1, ...) or (O, 1, ...)
        self._cache = (x_local, axis, y.shape)
        return y.astype(x.dtype, copy=False)

    def backward(self, grad_output):
        """dx of the same kind (full or sharded) as forward's input; accumulates grads."""
        x_local, axis, shape = self._cached()
        self._check_grad(grad_output, shape, x_local.dtype)
        if self.bias is not None:
            reduce = tuple(a for a in range(grad_output.ndim) if a != axis)
            work = np.float32 if grad_output.dtype == np.float16 else grad_output.dtype
            db = grad_output.sum(axis=reduce, dtype=work).astype(grad_output.dtype)
            self.bias.accumulate_grad(db)
        dx = self._conv_backward(grad_output, x_local, False)
        return self._input_grad(dx, axis)


class ColumnParallelConv1d(_ColumnParallelConv):
    """``nn.Conv1d`` with its output channels split across ``comm`` (module docstring)."""

    _serial = nn.Conv1d


class ColumnParallelConv2d(_ColumnParallelConv):
    """``nn.Conv2d`` with its output channels split across ``comm`` (module docstring)."""

    _serial = nn.Conv2d


class ColumnParallelConv3d(_ColumnParallelConv):
    """``nn.Conv3d`` with its output channels split across ``comm`` (module docstring)."""

    _serial = nn.Conv3d


class RowParallelConv1d(_RowParallelConv):
    """``nn.Conv1d`` with its input channels split across ``comm`` (module docstring)."""

    _serial = nn.Conv1d


class RowParallelConv2d(_RowParallelConv):
    """``nn.Conv2d`` with its input channels split across ``comm`` (module docstring)."""

    _serial = nn.Conv2d


class RowParallelConv3d(_RowParallelConv):
    """``nn.Conv3d`` with its input channels split across ``comm`` (module docstring)."""

    _serial = nn.Conv3d
