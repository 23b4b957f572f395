"""Small validators shared by every public entry point.

Each one turns a user value into a canonical one or raises: ``TypeError``
for a wrong type, ``ValueError`` for a wrong value. Messages name the
argument and end with what was received.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
CONV_MODES = ("cross_correlation", "convolution")
COMPUTE_MODES = ("default", "float32")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers, never for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_number(value: Any, name: str, *, sign: str | None = None) -> float:
    """A finite real number; ``sign`` 'positive' or 'non-negative' narrows it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, but got {type(value).__name__}: {name}={value!r}")
    if not math.isfinite(value) or (sign == "positive" and value <= 0) or (
        sign == "non-negative" and value < 0
    ):
        what = f"a finite {sign} number" if sign else "finite"
        raise ValueError(f"{name} must be {what}, but got {name}={value!r}")
    return float(value)


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, but got {type(value).__name__}: {name}={value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, but got {name}={value!r}")
    return int(value)


INT64_LIMIT = 2**63  # sizes, strides and paddings are int64 in every backend


def check_bool(value: Any, name: str) -> bool:
    """A bool (Python or NumPy); no truthy strings or ints."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, but got {type(value).__name__}: {name}={value!r}")
    return bool(value)


def check_int64(items: Any, name: str, value: Any) -> None:
    """Every int in ``items`` lies in (-2**63, 2**63); ``value`` is what the user passed."""
    if any(abs(v) >= INT64_LIMIT for v in items):
        raise ValueError(f"{name} must lie in (-2**63, 2**63) in every dimension, but got "
                         f"{name}={value!r}")  # fmt: skip


def int_tuple(value: Any, n: int, name: str, *, minimum: int | None = None) -> tuple[int, ...]:
    """An int or a sequence of ``n`` ints -> a tuple of ``n`` ints."""
    if is_int(value):
        items = (value,) * n
    elif isinstance(value, (tuple, list)) and all(is_int(v) for v in value):
        items = tuple(value)
        if len(items) != n:
            raise ValueError(
                f"{name} must be an int or a sequence of {n} ints (one per spatial "
                f"dimension), but got {len(items)} values: {name}={value!r}"
            )
    else:
        raise TypeError(
            f"{name} must be an int or a sequence of {n} ints, but got {name}={value!r}"
        )
    items = tuple(int(v) for v in items)
    check_int64(items, name, value)
    if minimum is not None and any(v < minimum for v in items):
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {what} in every dimension, but got {name}={value!r}")
    return items


def pad_fits(mode: str, before: int, after: int, size: int) -> bool:
    """PyTorch's limits on padding an axis of ``size``: reflect needs pad < size, circular
    pad <= size (it wraps around once at most), replicate a non-empty axis."""
    if mode == "reflect":
        return max(before, after) < size
    if mode == "circular":
        return max(before, after) <= size
    if mode == "replicate":
        return size > 0 or before + after == 0
    return True


def choice(value: Any, allowed: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be one of {allowed}, but got {type(value).__name__}: {name}={value!r}"
        )
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, but got {name}={value!r}")
    return value


PADDING_STRINGS = ("same", "same_lower", "valid")


def padding_pairs(
    padding: Any, n: int, name: str = "padding", allow_negative: bool = False
) -> tuple[tuple[int, int], ...] | str:
    """Normalise an explicit padding to ``n`` ``(before, after)`` pairs.

    Accepts an int, ``n`` ints (symmetric), or ``n`` pairs; negative amounts (crops) only with
    ``allow_negative``. The strings ``'same'``, ``'same_lower'`` and ``'valid'`` are
    returned as they are; resolving them needs the kernel and input, see ``geometry``.
    """
    if isinstance(padding, str):
        return choice(padding, PADDING_STRINGS, name)
    if is_int(padding):
        pairs = ((int(padding), int(padding)),) * n
    elif isinstance(padding, (tuple, list)):
        if len(padding) != n:
            raise ValueError(
                f"{name} must have one entry per spatial dimension ({n}), but got "
                f"{len(padding)}: {name}={padding!r}"
            )
        pairs = []
        for item in padding:
            if is_int(item):
                pairs.append((int(item), int(item)))
            elif (
                isinstance(item, (tuple, list)) and len(item) == 2 and all(is_int(v) for v in item)
            ):
                pairs.append((int(item[0]), int(item[1])))
            else:
                raise TypeError(
                    f"{name} entries must be ints or (before, after) pairs of ints, but got "
                    f"{item!r} in {name}={padding!r}"
                )
        pairs = tuple(pairs)
    else:
        raise TypeError(
            f"{name} must be an int, a sequence of ints or (before, after) pairs, 'same' or "
            f"'valid', but got {type(padding).__name__}: {name}={padding!r}"
        )
    check_int64([v for pair in pairs for v in pair], name, padding)
    if not allow_negative and any(v < 0 for pair in pairs for v in pair):
        raise ValueError(f"negative padding is not supported, but got {name}={padding!r}")
    return pairs


def is_cupy(value: Any) -> bool:
    """A CuPy array, told by its type's module: CuPy is never imported for this."""
    return type(value).__module__.split(".")[0] == "cupy"


def array_module(x: Any):
    """The array module of ``x``: ``cupy`` for a CuPy array (imported only then), else
    ``numpy``. The one place device code asks which functions to call."""
    if is_cupy(x):
        import cupy  # noqa: PLC0415 - only reached for CuPy arrays

        return cupy
    return np


def is_ndarray(value: Any) -> bool:
    """A NumPy or CuPy array."""
    return isinstance(value, np.ndarray) or is_cupy(value)


def check_array(value: Any, name: str, op: str) -> None:
    """Type and dtype check for an array argument (NumPy or CuPy)."""
    if not is_ndarray(value):
        raise TypeError(
            f"{op}: {name} must be an ndarray (numpy or cupy), but got {type(value).__name__}"
        )
    if np.dtype(value.dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, float32 or float64, but got {name}.dtype={value.dtype}"
        )


def check_same_dtype(op: str, **arrays: Any) -> None:
    present = {k: v for k, v in arrays.items() if v is not None}
    dtypes = {np.dtype(v.dtype) for v in present.values()}
    if len(dtypes) > 1:
        got = ", ".join(f"{k}.dtype={v.dtype}" for k, v in present.items())
        raise TypeError(f"{op}: {', '.join(present)} must have the same dtype, but got {got}")


def device_of(array: Any) -> str:
    """'cpu' for NumPy, 'cuda:i' for a CuPy array on GPU i (CuPy is never imported here)."""
    return f"cuda:{array.device.id}" if is_cupy(array) else "cpu"


def check_same_device(op: str, **arrays: Any) -> None:
    present = {k: v for k, v in arrays.items() if v is not None}
    if len({device_of(v) for v in present.values()}) > 1:
        got = ", ".join(f"{k} on {device_of(v)}" for k, v in present.items())
        raise ValueError(f"{op}: {', '.join(present)} must be on one device, but got {got}")


def shape_str(shape: tuple[int, ...]) -> str:
    """PyTorch's way of printing a size in messages: ``[1, 3, 5, 5]``."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"
