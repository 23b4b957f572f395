import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def stand_in(monkeypatch):
    """The strict CPU stand-in for CuPy (tests/cupy_stand_in) with the host build of the
    kernels, 2 GPUs, in ``sys.modules`` for one test."""
    import sys

    import cupy_stand_in

    for name in cupy_stand_in.MODULES:  # restored after the test
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))
    yield cupy_stand_in.install(device_count=2, kernels=True, nccl=False)
    from mconv.backends import cupy_backend

    cupy_backend._backends.clear()
