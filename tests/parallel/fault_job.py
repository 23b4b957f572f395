"""A data-parallel training job in which the last rank fails: ``fault_job.py MODE``.

MODE says what the last rank (the victim) does at step 3, while the other
ranks go on into the next gradient allreduce:

- ``raise``: an exception; ``kill``: SIGKILL; ``sleep``: sleeps for an hour;
- ``exit0`` / ``exit1``: ``sys.exit(0)`` / ``sys.exit(1)``;
- ``leave``: leaves the training loop and ends the script normally;
- ``mismatch``: a layer configured differently on the last rank (at construction);
- ``raise-before-init``: an exception before ``parallel.init()``, which the others are in.

The other ranks are then waiting in a collective; the job must still end
(with ``MCONV_PARALLEL_TIMEOUT`` set where nothing else ends it).
"""

import os
import signal
import sys
import time

import numpy as np

import mconv
import parallel
from mconv import losses, nn, optim
from mpi4py import MPI


def fail(mode: str, rank: int) -> bool:
    """What the victim does; True when it leaves the loop."""
    print(f"rank {rank} fails now ({mode})", flush=True)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "sleep":
        time.sleep(3600)
    if mode in ("exit0", "exit1"):
        sys.exit(int(mode[-1]))
    if mode == "leave":
        return True
    raise RuntimeError(f"boom on rank {rank}")


def main() -> None:
    mode = sys.argv[1]
    if mode == "raise-before-init" and MPI.COMM_WORLD.Get_rank() == MPI.COMM_WORLD.Get_size() - 1:
        raise RuntimeError("boom before init")
    comm = parallel.init()
    victim = comm.size - 1
    if mode == "mismatch":
        parallel.GroupParallelConv2d(4, 4, 3 + (comm.rank == victim), groups=4, comm=comm)
    mconv.manual_seed(0)
    model = parallel.DataParallel(
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)), comm
    )
    opt = optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(comm.rank)
    for step in range(100000):
        if step == 3 and comm.rank == victim and fail(mode, comm.rank):
            print(f"rank {comm.rank} left the training loop", flush=True)
            return
        x = rng.standard_normal((4, 1, 6, 6)).astype(np.float32)
        _, d = losses.cross_entropy(model(x), rng.integers(0, 3, 4))
        opt.zero_grad()
        model.backward(d)
        opt.step()
    print("the job went on after a rank failed", flush=True)


if __name__ == "__main__":
    main()
