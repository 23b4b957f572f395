"""float16 <-> float32 copies by the IR kernel (numpy_convert) and precision.store's use of it:
bit for bit what NumPy's casts give, for every kind of value and every layout of view."""

import numpy as np
import pytest

from mconv import precision
from mconv.backends import numpy_convert, numpy_llvm

pytestmark = pytest.mark.skipif(not numpy_llvm.available(), reason="llvmlite is not installed")


def _values(rng, shape):
    """float32 values of every kind: normal, halfway ties, over float16's range, subnormal,
    signed zeros, inf and NaN."""
    a = (rng.standard_normal(shape) * 300).astype(np.float32)
    flat = a.reshape(-1)
    special = [np.inf, -np.inf, np.nan, 65504.0, 65520.0, -65536.0, 1e-8, -3e-6, 6.1e-5, 0.0,
               -0.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2049.0, 2051.0]  # fmt: skip
    flat[: len(special)] = special
    return a


VIEWS = {
    "contiguous": lambda a: a,
    "inner slice": lambda a: a[..., 3:-2],
    "rows of a block": lambda a: a[:, 1:4],
    "every other image": lambda a: a[::2],
    "transposed (NumPy's copy)": lambda a: a.swapaxes(1, 2),
    "strided inner (NumPy's copy)": lambda a: a[..., ::2],
}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("direction", ["narrow", "widen"])
def test_copy_into_matches_numpy_bit_for_bit(rng, view, direction):
    a = _values(rng, (6, 5, 7, 40))
    src = a if direction == "narrow" else a.astype(np.float16)
    dtype = np.float16 if direction == "narrow" else np.float32
    src = VIEWS[view](src)
    dest = VIEWS[view](np.zeros(a.shape, dtype))
    numpy_convert.copy_into(dest, src)
    want = src.astype(dtype)
    np.testing.assert_array_equal(dest.view(np.uint16 if dtype == np.float16 else np.uint32),
                                  want.view(np.uint16 if dtype == np.float16 else np.uint32))  # fmt: skip


def test_widened_keeps_arrays_of_the_dtype(rng):
    a = rng.standard_normal((64, 80)).astype(np.float32)
    assert numpy_convert.widened(a, np.float32) is a
    h = a.astype(np.float16)
    np.testing.assert_array_equal(numpy_convert.widened(h, np.float32), h.astype(np.float32))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("bias_shape", [None, (1, 5, 1, 1), (5, 1, 1), (40,), (6, 1, 1, 1)])
def test_store_rounds_the_float32_sum_once(rng, bias_shape):
    """store(result, dest, bias) into float16: (result + bias) in float32, rounded once."""
    result = _values(rng, (6, 5, 7, 40))
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(np.float32)
    dest = np.empty(result.shape, np.float16)
    precision.store(result, dest, bias)
    want = (result if bias is None else result + bias).astype(np.float16)
    np.testing.assert_array_equal(dest.view(np.uint16), want.view(np.uint16))


def test_without_llvmlite_numpy_copies(monkeypatch, rng):
    monkeypatch.setitem(numpy_llvm._state, "llvm", False)
    a = rng.standard_normal((64, 80)).astype(np.float32)
    dest = np.empty(a.shape, np.float16)
    numpy_convert.copy_into(dest, a)
    np.testing.assert_array_equal(dest, a.astype(np.float16))


def test_threads_compiling_at_once_share_one_kernel(monkeypatch, rng):
    """Workers that first ask for a kernel at the same moment get the same one (a second,
    dropped Kernel would free the machine code another worker is running)."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(numpy_convert, "_kernels", {})
    a = rng.standard_normal((8, 64, 80)).astype(np.float32)
    outs = [np.empty(a.shape, np.float16) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda out: numpy_convert.copy_into(out, a), outs))
    gc.collect()
    assert len(numpy_convert._kernels) == 1
    for out in outs:
        np.testing.assert_array_equal(out, a.astype(np.float16))
