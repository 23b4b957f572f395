"""Whether the GPU tests can run: CuPy importable and at least one CUDA device.

Test modules here set ``pytestmark = gpu_env.requires_gpu``; without CuPy or a
GPU they are skipped with the reason (CI has neither).
"""

import pytest


def _skip_reason():
    try:
        import cupy
    except Exception as error:  # ImportError, or CuPy present without its CUDA libraries
        return f"CuPy is not installed or not usable ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, no device
        return f"no CUDA device ({type(error).__name__}: {error})"
    return None if count > 0 else "no CUDA device (CuPy sees 0 devices)"


SKIP_REASON = _skip_reason()
requires_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        SKIP_REASON is not None, reason=f"GPU tests need CuPy and a GPU: {SKIP_REASON}"
    ),
]


def device_count() -> int:
    import cupy

    return cupy.cuda.runtime.getDeviceCount()
