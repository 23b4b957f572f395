"""Group-parallel convolutions: the G groups of a grouped conv split across ranks.

Rank r of a P-rank ``comm`` owns groups ``[r*G/P, (r+1)*G/P)``: input
channels ``[r*C/P, (r+1)*C/P)``, output channels ``[r*O/P, (r+1)*O/P)``
and the matching rows of the weight and the bias. Its shard is itself a
grouped conv with G/P groups, and groups never mix, so the shards compute
independently::

    channels  | c0 c1 c2 c3 | c4 c5 c6 c7 |      G = 4 groups, P = 2 ranks
    groups    |  g0  |  g1  |  g2  |  g3  |
    rank      |   rank 0    |   rank 1    |      rank r: groups 2r, 2r+1

Communication (all of it; sharded means: this rank's channel block):

    input       forward                    backward
    full        take own block (no comm)   allgather dx over channels
    sharded     none                       none
    output
    gathered    allgather y over channels  take own block of dy (no comm)
    sharded     none                       none

A layer with ``gather_output=False`` feeds a next group-parallel (or
row-parallel) layer with ``input_is_sharded=True`` with no communication
between them: both split channels into the same P blocks in rank order.
Elementwise layers (ReLU) and per-channel pools work on shards as they are.

G must be divisible by P (a ValueError says so otherwise).

>>> import numpy as np, mconv, parallel
>>> comm = parallel.init()
>>> mconv.manual_seed(0)
>>> conv = parallel.GroupParallelConv2d(12, 24, 3, padding=1, groups=12, comm=comm)
>>> x = np.ones((2, 12, 5, 5), dtype=np.float32)
>>> conv(x).shape, conv.backward(np.ones((2, 24, 5, 5), dtype=np.float32)).shape
((2, 24, 5, 5), (2, 12, 5, 5))
>>> conv.weight.shape == (24 // comm.size, 1, 3, 3)   # this rank's shard
True
"""

from __future__ import annotations

from typing import Any, Sequence

from mconv import nn

from .sharded import ShardedConv


class _GroupParallel(ShardedConv):
    """Arguments: those of the serial layer, plus keyword-only ``comm``,
    ``input_is_sharded=False`` and ``gather_output=True``."""

    shard_axes = {"weight": 0, "bias": 0}

    def __init__(
        self,
        *args: Any,
        comm: Any,
        input_is_sharded: bool = False,
        gather_output: bool = True,
        **kwargs: Any,
    ):
        flags = {"input_is_sharded": input_is_sharded, "gather_output": gather_output}
        super().__init__(*args, comm=comm, flags=flags, **kwargs)

    def _check_split(self, full) -> None:
        self._divisible(full.groups, "groups", "its groups")

    def _local_groups(self, full) -> int:
        return full.groups // self.comm.size

    def forward(self, x, output_size: Sequence[int] | None = None):
        x_local, axis = self._local_input(x)
        y_local = self._conv(x_local, None if self.bias is None else self.bias.data, output_size)
        self._cache = (x_local, axis, y_local.shape, output_size)
        return self._output(y_local, axis)

    def backward(self, grad_output):
        """dx of the same kind (full or sharded) as forward's input; accumulates grads."""
        x_local, axis, local_shape, output_size = self._cached()
        dy = self._local_grad(grad_output, local_shape, axis, x_local.dtype)
        dx = self._conv_backward(dy, x_local, self.bias is not None, output_size)
        return self._input_grad(dx, axis)


class _GroupParallelConv(_GroupParallel):
    def forward(self, x):
        return super().forward(x)


class GroupParallelConv1d(_GroupParallelConv):
    """``nn.Conv1d`` with its groups split across ``comm`` (see the module docstring)."""

    _serial = nn.Conv1d


class GroupParallelConv2d(_GroupParallelConv):
    """``nn.Conv2d`` with its groups split across ``comm`` (see the module docstring)."""

    _serial = nn.Conv2d


class GroupParallelConv3d(_GroupParallelConv):
    """``nn.Conv3d`` with its groups split across ``comm`` (see the module docstring)."""

    _serial = nn.Conv3d


class GroupParallelConvTranspose1d(_GroupParallel):
    """``nn.ConvTranspose1d`` with its groups split across ``comm``; ``forward(x, output_size)``."""

    _serial = nn.ConvTranspose1d


class GroupParallelConvTranspose2d(_GroupParallel):
    """``nn.ConvTranspose2d`` with its groups split across ``comm``; ``forward(x, output_size)``."""

    _serial = nn.ConvTranspose2d


class GroupParallelConvTranspose3d(_GroupParallel):
    """``nn.ConvTranspose3d`` with its groups split across ``comm``; ``forward(x, output_size)``."""

    _serial = nn.ConvTranspose3d
