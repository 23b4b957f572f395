"""Explicit padding (zeros, reflect, replicate, circular) and its adjoint.

A non-zero padding mode is a gather along each padded axis: output
position ``j`` (``-before <= j < size + after``) reads input ``source(j)``:

    reflect    source(j) = -j for j < 0,  2*(size-1) - j for j >= size
    replicate  source(j) = clip(j, 0, size-1)
    circular   source(j) = j mod size

The adjoint of a gather is a scatter-add: ``dx[source(j)] += dy[j]``.
The interior (``0 <= j < size``) is the identity, so ``pad_backward``
starts from the interior slice and adds the border rows one by one, in a
fixed order (deterministic, no atomics needed on any backend).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _args
from ._args import array_module, shape_str

Pairs = Sequence[tuple[int, int]]


def _source_index(size: int, before: int, after: int, mode: str) -> np.ndarray:
    # host: a small index vector, copied to the input's device by the caller (xp.asarray)
    j = np.arange(-before, size + after)
    if mode == "reflect":
        return np.where(j < 0, -j, np.where(j >= size, 2 * (size - 1) - j, j))  # host: indices
    if mode == "replicate":
        return np.clip(j, 0, size - 1)  # host: indices
    return np.mod(j, size)  # host: indices (circular)


def _axis_slice(ndim: int, axis: int, index: Any) -> tuple:
    key = [slice(None)] * ndim
    key[axis] = index
    return tuple(key)


def pad_unchecked(x, pairs: Pairs, mode: str):
    """Pad the last ``len(pairs)`` axes of ``x``; arguments already validated."""
    xp = array_module(x)
    first = x.ndim - len(pairs)
    if mode == "zeros":
        if not any(lo or hi for lo, hi in pairs):
            return x
        shape = x.shape[:first] + tuple(s + lo + hi for s, (lo, hi) in zip(x.shape[first:], pairs))
        out = xp.zeros(shape, dtype=x.dtype)
        out[(Ellipsis, *(slice(lo, lo + s) for s, (lo, _) in zip(x.shape[first:], pairs)))] = x
        return out
    for axis, (lo, hi) in enumerate(pairs, start=first):
        if lo or hi:
            index = xp.asarray(_source_index(x.shape[axis], lo, hi, mode))
            x = xp.take(x, index, axis=axis)
    return x


def pad_backward_unchecked(dy, pairs: Pairs, mode: str):
    """Adjoint of ``pad_unchecked``: crop (zeros) or scatter-add the border back."""
    first = dy.ndim - len(pairs)
    if mode == "zeros":
        return dy[
            (Ellipsis, *(slice(lo, dy.shape[first + i] - hi) for i, (lo, hi) in enumerate(pairs)))
        ]
    for axis, (lo, hi) in enumerate(pairs, start=first):
        if not (lo or hi):
            continue
        size = dy.shape[axis] - lo - hi
        source = _source_index(size, lo, hi, mode)
        dx = dy[_axis_slice(dy.ndim, axis, slice(lo, lo + size))].copy()
        for j in [*range(lo), *range(lo + size, lo + size + hi)]:
            dx[_axis_slice(dy.ndim, axis, int(source[j]))] += dy[_axis_slice(dy.ndim, axis, j)]
        dy = dx
    return dy


_PAD_LIMITS = {
    "reflect": "mode='reflect' needs every pad < the size of its axis, but got pads={pads!r} "
    "for input of size {shape}",
    "circular": "mode='circular' needs every pad <= the size of its axis, but got pads={pads!r} "
    "for input of size {shape}",
    "replicate": "mode='replicate' cannot pad an empty axis; input of size {shape}",
}


def _check_pad_args(x, pads, mode: str, op: str) -> tuple[tuple[tuple[int, int], ...], str]:
    _args.check_array(x, "input", op)
    mode = _args.choice(mode, _args.PADDING_MODES, "mode")
    if not isinstance(pads, (tuple, list)) or len(pads) == 0:
        raise TypeError(
            f"{op}: pads must be a non-empty sequence with one int or (before, after) pair per "
            f"padded trailing axis, but got pads={pads!r}"
        )
    if len(pads) > x.ndim:
        raise ValueError(
            f"{op}: pads has {len(pads)} entries but input has only {x.ndim} axes; "
            f"received pads={pads!r}"
        )
    pairs = _args.padding_pairs(list(pads), len(pads), "pads")
    sizes = x.shape[x.ndim - len(pairs) :]
    for (lo, hi), size in zip(pairs, sizes):
        if not _args.pad_fits(mode, lo, hi, size):
            raise ValueError(
                f"{op}: " + _PAD_LIMITS[mode].format(pads=pads, shape=shape_str(x.shape))
            )
    return pairs, mode


def pad(x, pads: Sequence[Any], mode: str = "zeros"):
    """Pad the last ``len(pads)`` axes of ``x``.

    ``pads`` lists one entry per padded trailing axis, first axis first: an
    int (both sides) or a ``(before, after)`` pair. (This is NumPy's order,
    not ``torch.nn.functional.pad``'s reversed flat tuple.) Each padded axis
    grows to ``size + before + after``. ``mode`` is ``'zeros'``,
    ``'reflect'`` (pad < size), ``'replicate'`` or ``'circular'``
    (pad <= size).

    >>> import numpy as np
    >>> pad(np.arange(3.0), [(2, 1)], "reflect")
    array([2., 1., 0., 1., 2., 1.])
    """
    pairs, mode = _check_pad_args(x, pads, mode, "pad")
    return pad_unchecked(x, pairs, mode)


def pad_backward(dy, pads: Sequence[Any], mode: str = "zeros"):
    """Adjoint of :func:`pad`: the gradient of the unpadded input.

    >>> import numpy as np
    >>> pad_backward(np.ones(6), [(2, 1)], "reflect")
    array([1., 3., 2.])
    """
    pairs, _ = _check_pad_args(dy, pads, "zeros", "pad_backward")  # padded sizes checked below
    mode = _args.choice(mode, _args.PADDING_MODES, "mode")
    for (lo, hi), size in zip(pairs, dy.shape[dy.ndim - len(pairs) :]):
        inner = size - lo - hi
        if inner <= 0 or not _args.pad_fits(mode, lo, hi, inner):
            raise ValueError(
                f"pad_backward: pads={pads!r} do not fit a padded gradient of size "
                f"{shape_str(dy.shape)} with mode={mode!r}"
            )
    return pad_backward_unchecked(dy, pairs, mode)
