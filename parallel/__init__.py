"""mpi4py (+NCCL) data-parallel and group/channel-parallel execution.

Launch every script with ``mpiexec -n P python -m mpi4py script.py`` (see
docs/parallel.md); ``import parallel`` itself does not start MPI.

>>> import numpy as np, parallel
>>> comm = parallel.init()                      # a duplicate of MPI's COMM_WORLD
>>> data_comm, group_comm = comm.grid(group_parallel=1)
>>> data_comm.size == comm.size and group_comm.size == 1
True
"""

from .comm import REDUCE_OPS, Communicator
from .data_parallel import DataParallel
from .group_parallel import (GroupParallelConv1d, GroupParallelConv2d, GroupParallelConv3d,
                             GroupParallelConvTranspose1d, GroupParallelConvTranspose2d,
                             GroupParallelConvTranspose3d)  # fmt: skip
from .norm import ShardedBatchNorm1d, ShardedBatchNorm2d, ShardedBatchNorm3d, SyncBatchNorm
from .sharded import Sharded, ShardedConv
from .sharding import shard, shard_range, shard_sizes
from .state import (gather_state_dict, load_shard, merge_shards, save_full, save_shard,
                    scatter_state_dict, shard_path)  # fmt: skip
from .tensor_parallel import (ColumnParallelConv1d, ColumnParallelConv2d, ColumnParallelConv3d,
                              RowParallelConv1d, RowParallelConv2d, RowParallelConv3d)  # fmt: skip
from .world import init

__all__ = [
    "init", "Communicator", "REDUCE_OPS", "DataParallel",
    "GroupParallelConv1d", "GroupParallelConv2d", "GroupParallelConv3d",
    "GroupParallelConvTranspose1d", "GroupParallelConvTranspose2d", "GroupParallelConvTranspose3d",
    "ColumnParallelConv1d", "ColumnParallelConv2d", "ColumnParallelConv3d",
    "RowParallelConv1d", "RowParallelConv2d", "RowParallelConv3d",
    "SyncBatchNorm", "ShardedBatchNorm1d", "ShardedBatchNorm2d", "ShardedBatchNorm3d",
    "Sharded", "ShardedConv", "shard", "shard_range", "shard_sizes",
    "gather_state_dict", "scatter_state_dict", "save_shard", "load_shard", "merge_shards",
    "save_full", "shard_path",
]  # fmt: skip
