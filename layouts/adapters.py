"""Weight-layout adapters between PyTorch's layout and other frameworks'.

PyTorch's layout (mconv's only internal layout), N spatial dims, G groups:
conv ``(O, I/G, *k)``, transposed conv ``(I, O/G, *k)``, bias ``(O,)``.

| framework | conv / depthwise | transposed conv | bias |
| --- | --- | --- | --- |
| torch, tripy, onnx | ``(O, I/G, *k)`` | ``(I, O/G, *k)`` | ``(O,)`` |
| oneflow | as torch; ``channels_last=True``: ``(O, *k, I/G)`` | as torch | ``(O,)`` |
| megengine | ``(G, O/G, I/G, *k)`` if G > 1 else ``(O, I, *k)`` | ``(G, I/G, O/G, *k)`` if G > 1 else ``(I, O, *k)`` | ``(1, O, *[1]*N)`` |
| tensorflow (Keras) | conv ``(*k, I/G, O)``; depthwise ``(*k, C, M)`` | ``(*k, O, I)`` (G = 1) | ``(O,)`` |
| jax (Flax) | ``(*k, I/G, O)`` | ``(*k, I, O)``, kernel flipped (G = 1) | ``(O,)`` |

Keras depthwise: output channel ``c*M + m`` holds ``[..., c, m]``. Results are
views of ``w`` where NumPy allows (like ``np.transpose``), so converting a
memory-mapped checkpoint copies nothing until it is written. Flax's
``ConvTranspose`` (``transpose_kernel=False``) correlates the dilated input
with its kernel, which is PyTorch's kernel flipped in every spatial axis.

>>> import numpy as np
>>> w = np.zeros((6, 2, 3, 3))                        # torch, groups=3
>>> from_torch(w, "megengine", kind="conv", groups=3).shape
(3, 2, 2, 3, 3)
>>> to_torch(np.zeros((3, 2, 2, 3, 3)), "megengine", kind="conv").shape
(6, 2, 3, 3)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mconv._args import shape_str

FRAMEWORKS = ("torch", "megengine", "oneflow", "tensorflow", "onnx", "jax", "tripy")
KINDS = ("conv", "conv_transpose", "depthwise")
_TORCH_LIKE = ("torch", "tripy", "onnx")


def _check_common(w: Any, framework: Any, kind: Any, groups: Any, ndim: Any, what: str):
    if not isinstance(w, np.ndarray):
        raise TypeError(f"{what}: w must be a numpy.ndarray, but got {type(w).__name__}")
    if not isinstance(framework, str) or framework not in FRAMEWORKS:
        raise ValueError(
            f"{what}: framework must be one of {FRAMEWORKS}, but got framework={framework!r}"
        )
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"{what}: kind must be one of {KINDS}, but got kind={kind!r}")
    for name, value in (("groups", groups), ("ndim", ndim)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer))
        ):
            raise TypeError(f"{what}: {name} must be an int or None, but got {name}={value!r}")
        if value is not None and value < 1:
            raise ValueError(f"{what}: {name} must be >= 1, but got {name}={value!r}")
    if w.ndim < 3:
        raise ValueError(
            f"{what}: a conv weight has at least 3 dimensions, but got w of size {shape_str(w.shape)}"
        )


def _spatial_last(w: np.ndarray, channel_axes: int) -> np.ndarray:
    """(*k, a, b) -> (a, b, *k) for ``channel_axes`` = 2 trailing channel axes."""
    n = w.ndim - channel_axes
    return np.moveaxis(w, tuple(range(n)), tuple(range(channel_axes, w.ndim)))


def _spatial_first(w: np.ndarray, channel_axes: int) -> np.ndarray:
    """(a, b, *k) -> (*k, a, b)."""
    n = w.ndim - channel_axes
    return np.moveaxis(w, tuple(range(channel_axes, w.ndim)), tuple(range(n)))


def _flip(w: np.ndarray, first_spatial: int) -> np.ndarray:
    return w[(slice(None),) * first_spatial + (slice(None, None, -1),) * (w.ndim - first_spatial)]


def _megengine_rank(w: np.ndarray, groups: int | None, ndim: int | None) -> int:
    """Spatial rank of a MegEngine weight. Its shape encodes G (one more axis), so a
    4-d or 5-d weight is ambiguous without ``ndim``/``groups``: the 2-d reading wins."""
    if ndim is not None:
        if w.ndim not in (ndim + 2, ndim + 3):
            raise ValueError(f"to_torch: a MegEngine weight for ndim={ndim} has {ndim + 2} or "
                             f"{ndim + 3} dimensions, but got w of size {shape_str(w.shape)}")  # fmt: skip
        return ndim
    if groups is not None:
        return w.ndim - (3 if groups > 1 else 2)
    return {3: 1, 4: 2, 5: 2, 6: 3}.get(w.ndim, w.ndim - 3)


def _require_groups(groups: int | None, framework: str, kind: str) -> int:
    if groups is None:
        raise ValueError(f"from_torch: {framework} {kind} weights encode the group count, so "
                         f"groups is required, but got groups=None")  # fmt: skip
    return groups


def to_torch(w: np.ndarray, framework: str, kind: str = "conv", groups: int | None = None, *,
             ndim: int | None = None, channels_last: bool = False) -> np.ndarray:  # fmt: skip
    """Convert a ``framework``-layout weight to PyTorch's layout.

    ``groups`` is needed only where the foreign shape does not say it and the
    conversion depends on it; where the shape encodes it (MegEngine), a given
    ``groups`` must agree. ``ndim`` (spatial rank) resolves MegEngine's 4-d/5-d
    ambiguity (default: the 2-d reading).
    """
    _check_common(w, framework, kind, groups, ndim, "to_torch")
    if channels_last and framework != "oneflow":
        raise ValueError(
            f"to_torch: channels_last applies to oneflow only, but got framework={framework!r}"
        )
    if framework in _TORCH_LIKE or (framework == "oneflow" and not channels_last):
        return w
    if framework == "oneflow":  # (O, *k, I/G) -> (O, I/G, *k)
        if kind == "conv_transpose":
            raise ValueError(
                "to_torch: oneflow channels_last applies to conv weights, but got kind='conv_transpose'"
            )
        return np.moveaxis(w, -1, 1)
    if framework == "megengine":
        n = _megengine_rank(w, groups, ndim)
        if w.ndim == n + 2:  # ungrouped: (O, I, *k) or (I, O, *k), already torch's
            if groups not in (None, 1):
                raise ValueError(f"to_torch: an ungrouped MegEngine weight of size {shape_str(w.shape)} does "
                                 f"not match groups={groups}")  # fmt: skip
            return w
        if groups is not None and w.shape[0] != groups:
            raise ValueError(f"to_torch: the MegEngine weight's group axis holds {w.shape[0]} groups, "
                             f"but got groups={groups} (w of size {shape_str(w.shape)})")  # fmt: skip
        # (G, O/G, I/G, *k) -> (O, I/G, *k);  transposed (G, I/G, O/G, *k) -> (I, O/G, *k)
        return w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])
    if framework == "tensorflow" and kind == "depthwise":  # (*k, C, M) -> (C*M, 1, *k)
        c, m = w.shape[-2:]
        return _spatial_last(w, 2).reshape(c * m, 1, *w.shape[:-2])
    if kind == "conv_transpose":
        if groups not in (None, 1):
            raise ValueError(
                f"to_torch: {framework} transposed convs have no groups, but got groups={groups}"
            )
        torch_w = _spatial_last(w, 2)  # (*k, O, I) -> (O, I, *k)  [tensorflow]; (I, O, *k) [jax]
        if framework == "tensorflow":  # (O, I, *k) -> (I, O, *k)
            return torch_w.swapaxes(0, 1)
        return _flip(torch_w, 2)
    # tensorflow / jax conv: (*k, I/G, O) -> (O, I/G, *k)
    return _spatial_last(w, 2).swapaxes(0, 1)


def from_torch(w: np.ndarray, framework: str, kind: str = "conv", groups: int | None = None, *,
               channels_last: bool = False) -> np.ndarray:  # fmt: skip
    """Convert a PyTorch-layout weight to ``framework``'s layout (inverse of :func:`to_torch`).

    ``groups`` is required where the target layout encodes it (MegEngine,
    Keras depthwise); the spatial rank is ``w.ndim - 2``.
    """
    _check_common(w, framework, kind, groups, None, "from_torch")
    if channels_last and framework != "oneflow":
        raise ValueError(
            f"from_torch: channels_last applies to oneflow only, but got framework={framework!r}"
        )
    if framework in _TORCH_LIKE or (framework == "oneflow" and not channels_last):
        return w
    if framework == "oneflow":  # (O, I/G, *k) -> (O, *k, I/G)
        if kind == "conv_transpose":
            raise ValueError(
                "from_torch: oneflow channels_last applies to conv weights, but got kind='conv_transpose'"
            )
        return np.moveaxis(w, 1, -1)
    if framework == "megengine":
        groups = _require_groups(groups, framework, kind)
        if w.shape[0] % groups:
            raise ValueError(
                f"from_torch: dimension 0 of w (size {shape_str(w.shape)}) is not divisible by groups={groups}"
            )
        if groups == 1:
            return w
        # (O, I/G, *k) -> (G, O/G, I/G, *k);  transposed (I, O/G, *k) -> (G, I/G, O/G, *k)
        return w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    if framework == "tensorflow" and kind == "depthwise":  # (C*M, 1, *k) -> (*k, C, M)
        channels = _require_groups(groups, framework, kind)
        if w.shape[1] != 1 or w.shape[0] % channels:
            raise ValueError(f"from_torch: a depthwise weight is (C*M, 1, *k) with C=groups={channels}, "
                             f"but got w of size {shape_str(w.shape)}")  # fmt: skip
        return _spatial_first(w.reshape(channels, -1, *w.shape[2:]), 2)
    if kind == "conv_transpose":
        if groups not in (None, 1):
            raise ValueError(
                f"from_torch: {framework} transposed convs have no groups, but got groups={groups}"
            )
        if framework == "tensorflow":  # (I, O, *k) -> (*k, O, I)
            return _spatial_first(w.swapaxes(0, 1), 2)
        return _spatial_first(_flip(w, 2), 2)  # jax: (*k, I, O), flipped
    # tensorflow / jax conv: (O, I/G, *k) -> (*k, I/G, O)
    return _spatial_first(w.swapaxes(0, 1), 2)


def _check_bias(b: Any, framework: Any, what: str) -> None:
    if not isinstance(b, np.ndarray):
        raise TypeError(f"{what}: b must be a numpy.ndarray, but got {type(b).__name__}")
    if not isinstance(framework, str) or framework not in FRAMEWORKS:
        raise ValueError(
            f"{what}: framework must be one of {FRAMEWORKS}, but got framework={framework!r}"
        )


def bias_to_torch(b: np.ndarray, framework: str) -> np.ndarray:
    """A framework's bias -> ``(O,)``. MegEngine's ``(1, O, 1, ...)`` is flattened.

    >>> bias_to_torch(np.zeros((1, 4, 1, 1)), "megengine").shape
    (4,)
    """
    _check_bias(b, framework, "bias_to_torch")
    if framework == "megengine" and b.ndim >= 2:
        if b.shape[0] != 1 or any(s != 1 for s in b.shape[2:]):
            raise ValueError(
                f"bias_to_torch: a MegEngine bias is (1, O, 1, ...), but got b of size {shape_str(b.shape)}"
            )
        return b.reshape(b.shape[1])
    if b.ndim != 1:
        raise ValueError(
            f"bias_to_torch: a {framework} bias is 1-dimensional, but got b of size {shape_str(b.shape)}"
        )
    return b


def bias_from_torch(b: np.ndarray, framework: str, ndim: int | None = None) -> np.ndarray:
    """``(O,)`` -> the framework's bias; MegEngine needs the spatial rank ``ndim``.

    >>> bias_from_torch(np.zeros(4), "megengine", ndim=2).shape
    (1, 4, 1, 1)
    """
    _check_bias(b, framework, "bias_from_torch")
    if b.ndim != 1:
        raise ValueError(
            f"bias_from_torch: a PyTorch bias is 1-dimensional, but got b of size {shape_str(b.shape)}"
        )
    if framework != "megengine":
        return b
    if isinstance(ndim, bool) or not isinstance(ndim, (int, np.integer)) or ndim < 1:
        raise ValueError(
            f"bias_from_torch: MegEngine biases need the spatial rank, ndim >= 1, but got ndim={ndim!r}"
        )
    return b.reshape(1, b.shape[0], *(1,) * ndim)
