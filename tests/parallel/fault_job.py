"""A data-parallel training job in which the last rank fails: ``fault_job.py MODE``.

MODE: ``raise`` (an exception mid-training), ``kill`` (SIGKILL mid-training)
or ``mismatch`` (a layer configured differently on the last rank). The
other ranks are then waiting in a collective; the job must still end.
"""

import os
import signal
import sys

import numpy as np

import mconv
import parallel
from mconv import losses, nn, optim


def main() -> None:
    mode = sys.argv[1]
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
        if step == 3 and comm.rank == victim:
            print(f"rank {comm.rank} fails now ({mode})", flush=True)
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"boom on rank {comm.rank}")
        x = rng.standard_normal((4, 1, 6, 6)).astype(np.float32)
        _, d = losses.cross_entropy(model(x), rng.integers(0, 3, 4))
        opt.zero_grad()
        model.backward(d)
        opt.step()
    print("the job went on after a rank failed", flush=True)


if __name__ == "__main__":
    main()
