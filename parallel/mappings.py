"""Communication between channel shards, as pairs: each step a forward and its adjoint
backward (Megatron-LM's ``mappings``), used in one line by the parallel layers.

Channels are split into ``comm.size`` blocks in rank order along the channel ``axis`` (1 for
batched ``(B, C, *S)``, 0 for unbatched ``(C, *S)``); ``shard`` takes this rank's block.

    step              forward                      backward (its adjoint)
    CopyToShards      x (every rank uses all of x) allreduce(sum) of the ranks' dx
    ReduceFromShards  allreduce(sum) of partial y  dy (every rank gets all of it)
    ScatterToShards   this rank's block of x       allgather of the ranks' dx blocks
    GatherFromShards  allgather of the y blocks    this rank's block of dy
    NoComm            x                            dy

Each pair is adjoint: <forward(x), y> summed over ranks equals <x, backward(y)>; e.g. the
transpose of "give x to every rank" is "sum what the ranks send back".

>>> import numpy as np, parallel
>>> comm = parallel.init()
>>> step = GatherFromShards(comm)
>>> y = step.forward(np.ones((2, 3)), axis=1)
>>> y.shape == (2, 3 * comm.size), step.backward(y, axis=1).shape
(True, (2, 3))
"""

from __future__ import annotations

from .sharding import shard


class NoComm:
    """Nothing to send: the input is already what the next step needs."""

    def __init__(self, comm=None):
        self.comm = comm

    def forward(self, x, axis: int):
        return x

    def backward(self, dy, axis: int):
        return dy


class CopyToShards(NoComm):
    """Every rank computes from the full x; the gradients of the copies add up."""

    def backward(self, dy, axis: int):
        return self.comm.allreduce(dy, "sum", out=dy)


class ReduceFromShards(NoComm):
    """Partial outputs add up on every rank; each partial's gradient is all of dy."""

    def forward(self, x, axis: int):
        return self.comm.allreduce(x, "sum", out=x)


class ScatterToShards(NoComm):
    """Full x -> this rank's channel block; the blocks' gradients are gathered back."""

    def forward(self, x, axis: int):
        return shard(x, self.comm, axis)

    def backward(self, dy, axis: int):
        return self.comm.allgather(dy, axis=axis, check=False)


class GatherFromShards(NoComm):
    """The ranks' channel blocks -> the full y; each block's gradient is its part of dy."""

    def forward(self, x, axis: int):
        return self.comm.allgather(x, axis=axis, check=False)

    def backward(self, dy, axis: int):
        return shard(dy, self.comm, axis)
