"""Group-parallel convolutions: the G groups of a grouped conv split across ranks.

Rank r of a P-rank ``comm`` owns groups ``[r*G/P, (r+1)*G/P)``: input
channels ``[r*C/P, (r+1)*C/P)``, output channels ``[r*O/P, (r+1)*O/P)``
and the matching rows of the weight and the bias. Its shard is itself a
grouped conv with G/P groups, and groups never mix, so the shards compute
independently::

    channels  | c0 c1 c2 c3 | c4 c5 c6 c7 |      G = 4 groups, P = 2 ranks
    groups    |  g0  |  g1  |  g2  |  g3  |
    rank      |   rank 0    |   rank 1    |      rank r: groups 2r, 2r+1

The layer is that local conv between two steps of ``parallel.mappings``:

    input       step (forward / backward)
    full        ScatterToShards: take own block / allgather dx over channels
    sharded     NoComm
    output
    gathered    GatherFromShards: allgather y over channels / take own block of dy
    sharded     NoComm

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

from .mappings import GatherFromShards, NoComm, ScatterToShards
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

    def _local_layer(self, full, shards: dict):
        return full.on_shard(shards["weight"], shards.get("bias"), full.groups // self.comm.size)

    def _steps(self) -> tuple:
        before = NoComm if self.input_is_sharded else ScatterToShards
        after = GatherFromShards if self.gather_output else NoComm
        return before(self.comm), after(self.comm)


class _GroupParallelConv(_GroupParallel):
    def forward(self, x):
        return super().forward(x)


class _GroupParallelConvTranspose(_GroupParallel):
    def forward(self, x, output_size: Sequence[int] | None = None):
        """``output_size``: as the serial layer's (the local shard has the same spatial sizes)."""
        return super().forward(x, output_size=output_size)


class GroupParallelConv1d(_GroupParallelConv):
    """``nn.Conv1d`` with its groups split across ``comm`` (see the module docstring)."""

    _serial = nn.Conv1d


class GroupParallelConv2d(_GroupParallelConv):
    """``nn.Conv2d`` with its groups split across ``comm`` (see the module docstring)."""

    _serial = nn.Conv2d


class GroupParallelConv3d(_GroupParallelConv):
    """``nn.Conv3d`` with its groups split across ``comm`` (see the module docstring)."""

    _serial = nn.Conv3d


class GroupParallelConvTranspose1d(_GroupParallelConvTranspose):
    """``nn.ConvTranspose1d`` with its groups split across ``comm``; ``forward(x, output_size)``."""

    _serial = nn.ConvTranspose1d


class GroupParallelConvTranspose2d(_GroupParallelConvTranspose):
    """``nn.ConvTranspose2d`` with its groups split across ``comm``; ``forward(x, output_size)``."""

    _serial = nn.ConvTranspose2d


class GroupParallelConvTranspose3d(_GroupParallelConvTranspose):
    """``nn.ConvTranspose3d`` with its groups split across ``comm``; ``forward(x, output_size)``."""

    _serial = nn.ConvTranspose3d
