"""BatchNorm across ranks: ``SyncBatchNorm`` (statistics over the data-parallel ranks) and
``ShardedBatchNorm1d/2d/3d`` (BatchNorm on channel-sharded activations: no communication).

SyncBatchNorm is ``nn.BatchNorm`` whose per-channel sums over the batch (count, sum of x,
sum of squared deviations; in backward sum of dy and of dy * xhat) are summed over the ranks
of ``comm`` in one allreduce each: it equals BatchNorm on the global batch, uneven local
batches included (a rank may hold no sample). ``weight.grad``/``bias.grad`` hold this rank's
contribution, as in PyTorch's SyncBatchNorm; DataParallel then averages them.

>>> import numpy as np, parallel
>>> comm = parallel.init()
>>> bn = parallel.SyncBatchNorm(3, comm, dtype="float64")
>>> bn(np.ones((2, 3, 4))).shape
(2, 3, 4)
"""

from __future__ import annotations

from typing import Any

from mconv import _args, nn
from mconv.nn.norm import _BatchNorm

from .comm import Communicator
from .mappings import GatherFromShards, NoComm, ScatterToShards
from .sharded import Sharded


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the whole data-parallel batch; any input of 2 to 5 dimensions, the
    channels on axis 1. Arguments: ``nn.BatchNorm2d``'s, with ``comm`` second."""

    _dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, comm: Any, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype: Any = "float32", device: str = "cpu"):  # fmt: skip
        if not isinstance(comm, Communicator):
            raise TypeError(
                f"SyncBatchNorm: comm must be a parallel.Communicator (from parallel.init()), but "
                f"got {type(comm).__name__}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype, device)
        object.__setattr__(self, "comm", comm)

    def _sums(self, *arrays):
        """Each (C,) partial sum added over the ranks: one allreduce for all of them."""
        xp = _args.array_module(arrays[0])
        sizes = [a.shape[0] for a in arrays]
        total = self.comm.allreduce(xp.concatenate(arrays), "sum")
        out, start = [], 0
        for size in sizes:
            out.append(total[start : start + size])
            start += size
        return tuple(out)


class _ShardedBatchNorm(Sharded):
    """BatchNorm over this rank's block of channels (``input_is_sharded=True`` by default:
    between group-/column-parallel layers that leave their output sharded). Statistics are
    per channel, so the blocks need nothing from each other. Arguments: the serial
    ``nn.BatchNorm*d``'s, plus keyword-only ``comm``, ``input_is_sharded=True``,
    ``gather_output=False`` and ``sync_comm=None``: a communicator over which the statistics
    are summed too (the data-parallel replicas of a grid: a SyncBatchNorm on the shard)."""

    shard_axes = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}

    def __init__(self, *args: Any, comm: Any, input_is_sharded: bool = True,
                 gather_output: bool = False, sync_comm: Any = None, **kwargs: Any):  # fmt: skip
        if sync_comm is not None and not isinstance(sync_comm, Communicator):
            raise TypeError(
                f"{type(self).__name__}: sync_comm must be None or a parallel.Communicator, but "
                f"got {type(sync_comm).__name__}"
            )
        object.__setattr__(self, "sync_comm", sync_comm)
        flags = {"input_is_sharded": input_is_sharded, "gather_output": gather_output}
        super().__init__(*args, comm=comm, flags=flags, **kwargs)

    def _describe(self, full) -> None:
        self.num_features = self.in_channels = full.num_features

    def _check_split(self, full) -> None:
        self._divisible(full.num_features, "num_features", "its channels")

    def _local_layer(self, full, shards: dict):
        local = full.on_shard(shards)
        if self.sync_comm is None:
            return local
        synced = SyncBatchNorm(local.num_features, self.sync_comm, local.eps, local.momentum,
                               local.affine, local.track_running_stats, local.dtype,
                               local.device)  # fmt: skip
        synced.load_state_dict(local.state_dict())
        return synced

    def _steps(self) -> tuple:
        before = NoComm if self.input_is_sharded else ScatterToShards
        after = GatherFromShards if self.gather_output else NoComm
        return before(self.comm), after(self.comm)


class ShardedBatchNorm1d(_ShardedBatchNorm):
    """``nn.BatchNorm1d`` on this rank's block of channels."""

    _serial = nn.BatchNorm1d


class ShardedBatchNorm2d(_ShardedBatchNorm):
    """``nn.BatchNorm2d`` on this rank's block of channels."""

    _serial = nn.BatchNorm2d


class ShardedBatchNorm3d(_ShardedBatchNorm):
    """``nn.BatchNorm3d`` on this rank's block of channels."""

    _serial = nn.BatchNorm3d
