"""``MCONV_TEST_CUPY_STAND_IN=1`` runs these tests on the strict CPU stand-in for CuPy
(tests/cupy_stand_in: 2 GPUs, the host build of the kernels, cuBLAS emulated) instead of
a real GPU; CI does so (tests/kernels/test_gpu_suite_on_stand_in.py). The MPI jobs of
test_gpu_parallel.py are left out then: CI runs the same checks on the stand-in at 1-4
ranks (tests/parallel/test_parallel_gpu_stand_in.py)."""

import os

ON_STAND_IN = os.environ.get("MCONV_TEST_CUPY_STAND_IN") == "1"
collect_ignore = ["test_gpu_parallel.py"] if ON_STAND_IN else []

if ON_STAND_IN:  # before gpu_env looks for CuPy
    import cupy_stand_in

    cupy_stand_in.install(device_count=2, kernels=True, nccl=False)
