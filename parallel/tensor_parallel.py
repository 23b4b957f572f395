"""Channel-parallel dense convolutions (groups=1), Megatron-style.

Column-parallel splits the output channels: rank r holds weight rows
``[r*O/P, (r+1)*O/P)`` (and that block of the bias) and computes its block
of y from the full input. Row-parallel splits the input channels: rank r
holds weight columns ``[r*C/P, (r+1)*C/P)`` and computes a partial y from
its block of x; the partial outputs are summed, then the (replicated) bias
is added::

    Column  y[:, block r] = conv(x, W[block r, :]) + b[block r]
    Row     y             = sum_r conv(x[:, block r], W[:, block r]) + b

Each is the serial conv on its shard between two steps of ``parallel.mappings``
(each a forward with its adjoint backward):

    layer   before                                  after
    Column  CopyToShards (dx: allreduce(sum))       GatherFromShards, or NoComm
    Row     ScatterToShards (dx: allgather), or     ReduceFromShards (y: allreduce(sum)),
            NoComm for a sharded input              then + b

The backward passes are the exact adjoints: the transpose of "replicate x
to every rank" is "sum the ranks' dx", the transpose of "sum the partial
outputs" is "give dy to every rank". A column-parallel layer with
``gather_output=False`` feeds a row-parallel one with
``input_is_sharded=True`` with no communication between them (the
two-layer Megatron block costs one allreduce forward and one backward).

fp16: the row-parallel partial sums stay in the accumulator (fp32; the local
conv's ``partial_sums``), are summed and biased in it and rounded once, as the
serial layer does (``mconv.precision``).

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

from mconv import nn
from mconv.precision import add_bias, channel_sum

from .mappings import CopyToShards, GatherFromShards, NoComm, ReduceFromShards, ScatterToShards
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

    def _steps(self) -> tuple:
        return CopyToShards(self.comm), (GatherFromShards if self.gather_output else NoComm)(
            self.comm
        )


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

    def _local_layer(self, full, shards: dict):
        """No bias (it is added once, after the sum); partial outputs in the accumulator."""
        return full.on_shard(shards["weight"], None, 1, partial_sums=True)

    def _steps(self) -> tuple:
        before = NoComm if self.input_is_sharded else ScatterToShards
        return before(self.comm), ReduceFromShards(self.comm)

    def forward(self, x):
        """The summed partial outputs plus the bias, rounded once into x's dtype."""
        y = add_bias(super().forward(x), self._bias_data(), self._cache[0])
        self._cache = (*self._cache[:1], y.shape, x.dtype)
        return y.astype(x.dtype, copy=False)

    def backward(self, grad_output):
        dx = super().backward(grad_output)  # checks grad_output; the local dW
        if self.bias is not None:
            self.bias.accumulate_grad(channel_sum(grad_output, self._cache[0]))
        return dx

    def _bias_data(self):
        return None if self.bias is None else self.bias.data


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
