"""``ConvGeometry``: one frozen, validated description of a convolution.

Every public entry point (functional ops, layers) builds a geometry once
from user arguments; backends receive only canonical values from it.

A geometry always describes a *forward convolution*:

    conv input  (B, in_channels,  *in_size)
    weight      (out_channels, in_channels / groups, *kernel_size)
    conv output (B, out_channels, *out_size)

    out_size[i] = floor((in_size[i] + before[i] + after[i]
                         - dilation[i] * (kernel_size[i] - 1) - 1) / stride[i]) + 1

A transposed convolution is described by the geometry of the convolution
whose input gradient it is: its *output* is the conv input and its *input*
is the conv output, so ``in_size`` is the transposed output size. Its
``output_padding`` only enlarges ``in_size``; ``out_size`` stays the
transposed input size (it can be one less than the formula above when
``output_padding >= stride``, which PyTorch allows when it is < dilation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from . import _args
from ._args import shape_str


@dataclass(frozen=True)
class ConvGeometry:
    in_channels: int
    out_channels: int
    groups: int
    in_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    out_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    padding_mode: str = "zeros"
    conv_mode: str = "cross_correlation"
    compute_mode: str = "default"

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions N."""
        return len(self.kernel_size)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.in_channels, *self.in_size)

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.out_channels, *self.out_size)

    @property
    def padded_size(self) -> tuple[int, ...]:
        """in_size plus (before, after) padding per spatial axis."""
        return tuple(s + lo + hi for s, (lo, hi) in zip(self.in_size, self.padding))

    def explicitly_padded(self) -> "ConvGeometry":
        """The zero-padding geometry that runs on an input already padded by ``padding_mode``."""
        return replace(
            self, in_size=self.padded_size, padding=((0, 0),) * self.ndim, padding_mode="zeros"
        )


def _split_batch(input_shape: Sequence[int], n: int, op: str) -> tuple[tuple[int, ...], bool]:
    """(B, C, *S) or (C, *S) -> batched shape and whether a batch axis was given."""
    if len(input_shape) == n + 2:
        return tuple(input_shape), True
    if len(input_shape) == n + 1:
        return (1, *input_shape), False
    raise ValueError(
        f"Expected {n + 1}D (unbatched) or {n + 2}D (batched) input to {op}, "
        f"but got input of size: {shape_str(input_shape)}"
    )


def _check_weight(weight_shape: Sequence[int], op: str, layout: str) -> int:
    n = len(weight_shape) - 2
    if n < 1:
        raise ValueError(
            f"{op}: weight must have at least 3 dimensions {layout}, but got weight of size "
            f"{shape_str(weight_shape)}"
        )
    if any(s <= 0 for s in weight_shape):
        raise ValueError(
            f"{op}: weight must not have empty dimensions, but got weight of size "
            f"{shape_str(weight_shape)}"
        )
    return n


def _check_groups(groups: Any, weight_shape: Sequence[int]) -> int:
    groups = _args.check_int(groups, "groups", minimum=1)
    if weight_shape[0] % groups:
        raise ValueError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {shape_str(weight_shape)} instead"
        )
    return groups


def _sizes(values: Sequence[int]) -> str:
    return "(" + " x ".join(str(v) for v in values) + ")"


def same_padding(
    kernel_size: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """PyTorch's split for padding='same': the odd element goes at the end."""
    pairs = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        pairs.append((total // 2, total - total // 2))
    return tuple(pairs)


def resolve_padding(
    padding: Any, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """Any accepted padding form -> per-dimension (before, after) pairs."""
    n = len(kernel_size)
    pairs = _args.padding_pairs(padding, n)
    if pairs == "valid":
        return ((0, 0),) * n
    if pairs == "same":
        if any(s != 1 for s in stride):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions, but got stride={tuple(stride)}"
            )
        return same_padding(kernel_size, dilation)
    return pairs


_MODE_LIMITS = {
    "reflect": "padding_mode='reflect' needs padding < input size in every dimension, but got "
    "padding ({lo}, {hi}) for spatial dimension {dim} of input {shape}",
    "circular": "padding_mode='circular' needs padding <= input size in every dimension (it may "
    "wrap around only once), but got padding ({lo}, {hi}) for spatial dimension {dim} of input "
    "{shape}",
    "replicate": "padding_mode='replicate' needs a non-empty input, but got input {shape}",
}


def _check_mode_limits(mode: str, pairs, in_size, input_shape) -> None:
    """PyTorch's limits (``_args.pad_fits``), with the conv's wording."""
    for dim, ((lo, hi), size) in enumerate(zip(pairs, in_size)):
        if not _args.pad_fits(mode, lo, hi, size):
            raise ValueError(
                _MODE_LIMITS[mode].format(lo=lo, hi=hi, dim=dim, shape=shape_str(input_shape))
            )


def conv_geometry(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: Any = 1,
    padding_mode: str = "zeros",
    conv_mode: str = "cross_correlation",
    compute_mode: str = "default",
    op: str = "conv",
) -> tuple[ConvGeometry, bool]:
    """Validate a convolution call; return its geometry and whether the input was batched."""
    n = _check_weight(weight_shape, op, "(out_channels, in_channels/groups, *kernel_size)")
    batched_shape, batched = _split_batch(input_shape, n, op)
    groups = _check_groups(groups, weight_shape)
    out_channels, in_per_group, *kernel = (int(s) for s in weight_shape)
    channels = batched_shape[1]
    if channels != in_per_group * groups:
        raise ValueError(
            f"Given groups={groups}, weight of size {shape_str(weight_shape)}, expected "
            f"input{shape_str(batched_shape)} to have {in_per_group * groups} channels, but got "
            f"{channels} channels instead"
        )
    stride = _args.int_tuple(stride, n, "stride", minimum=1)
    dilation = _args.int_tuple(dilation, n, "dilation", minimum=1)
    pairs = resolve_padding(padding, kernel, stride, dilation)
    padding_mode = _args.choice(padding_mode, _args.PADDING_MODES, "padding_mode")
    conv_mode = _args.choice(conv_mode, _args.CONV_MODES, "conv_mode")
    compute_mode = _args.choice(compute_mode, _args.COMPUTE_MODES, "compute_mode")
    in_size = tuple(int(s) for s in batched_shape[2:])
    if padding_mode != "zeros":
        _check_mode_limits(padding_mode, pairs, in_size, input_shape)
    padded = [s + lo + hi for s, (lo, hi) in zip(in_size, pairs)]
    effective = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if any(p < e for p, e in zip(padded, effective)):
        raise ValueError(
            f"Calculated padded input size per channel: {_sizes(padded)}. Kernel size: "
            f"{_sizes(effective)}. Kernel size can't be greater than actual input size"
        )
    out_size = tuple((p - e) // s + 1 for p, e, s in zip(padded, effective, stride))
    geom = ConvGeometry(
        channels,
        out_channels,
        groups,
        in_size,
        tuple(kernel),
        out_size,
        stride,
        dilation,
        pairs,
        padding_mode,
        conv_mode,
        compute_mode,
    )
    return geom, batched


def _transpose_output_padding(
    output_padding, output_size, in_size, batched, min_sizes, stride, dilation, n
) -> tuple[int, ...]:
    """PyTorch's ``_output_padding``: output_size wins over output_padding."""
    if output_size is None:
        op = _args.int_tuple(output_padding, n, "output_padding", minimum=0)
        if any(p >= s and p >= d for p, s, d in zip(op, stride, dilation)):
            raise ValueError(
                f"output padding must be smaller than either stride or dilation, but got "
                f"output_padding={op}, stride={stride}, dilation={dilation}"
            )
        return op
    if not isinstance(output_size, (tuple, list)) or not all(_args.is_int(v) for v in output_size):
        raise TypeError(
            f"output_size must be a sequence of ints, but got output_size={output_size!r}"
        )
    size = tuple(int(v) for v in output_size)
    non_spatial = 2 if batched else 1
    if len(size) == n + non_spatial:
        size = size[non_spatial:]  # a full (B, C, *S) or (C, *S) size: keep the spatial part
    if len(size) != n:
        raise ValueError(
            f"ConvTranspose{n}D: for {n + non_spatial}D input, output_size must have {n} or "
            f"{n + non_spatial} elements (got {len(output_size)})"
        )
    max_sizes = tuple(m + s - 1 for m, s in zip(min_sizes, stride))
    if any(not (lo <= v <= hi) for v, lo, hi in zip(size, min_sizes, max_sizes)):
        raise ValueError(
            f"requested an output size of {list(size)}, but valid sizes range from {list(min_sizes)} "
            f"to {list(max_sizes)} (for an input of {list(in_size)})"
        )
    return tuple(v - m for v, m in zip(size, min_sizes))


def conv_transpose_geometry(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    dilation: Any = 1,
    groups: Any = 1,
    output_size: Any = None,
    padding_mode: str = "zeros",
    conv_mode: str = "cross_correlation",
    compute_mode: str = "default",
    op: str = "conv_transpose",
) -> tuple[ConvGeometry, bool]:
    """Validate a transposed-convolution call.

    Output size per dimension (PyTorch's formula, with (before, after) pairs):
    ``(in - 1) * stride - before - after + dilation * (kernel - 1) + output_padding + 1``.
    """
    n = _check_weight(weight_shape, op, "(in_channels, out_channels/groups, *kernel_size)")
    batched_shape, batched = _split_batch(input_shape, n, op)
    groups = _check_groups(groups, weight_shape)
    in_channels, out_per_group, *kernel = (int(s) for s in weight_shape)
    if batched_shape[1] != in_channels:
        raise ValueError(
            f"Given transposed=1, weight of size {shape_str(weight_shape)}, expected "
            f"input{shape_str(batched_shape)} to have {in_channels} channels, but got "
            f"{batched_shape[1]} channels instead"
        )
    padding_mode = _args.choice(padding_mode, _args.PADDING_MODES, "padding_mode")
    if padding_mode != "zeros":
        raise ValueError(
            f'Only "zeros" padding mode is supported for ConvTranspose{n}d, but got '
            f"padding_mode={padding_mode!r}"
        )
    if padding == "same":
        raise ValueError(
            "padding='same' is not supported for transposed convolutions, but got padding='same'"
        )
    stride = _args.int_tuple(stride, n, "stride", minimum=1)
    dilation = _args.int_tuple(dilation, n, "dilation", minimum=1)
    pairs = resolve_padding(padding, kernel, stride, dilation)
    conv_mode = _args.choice(conv_mode, _args.CONV_MODES, "conv_mode")
    compute_mode = _args.choice(compute_mode, _args.COMPUTE_MODES, "compute_mode")
    in_size = tuple(int(s) for s in batched_shape[2:])
    min_sizes = tuple(
        (i - 1) * s - lo - hi + d * (k - 1) + 1
        for i, s, (lo, hi), d, k in zip(in_size, stride, pairs, dilation, kernel)
    )
    out_pad = _transpose_output_padding(
        output_padding, output_size, in_size, batched, min_sizes, stride, dilation, n
    )
    out_size = tuple(m + p for m, p in zip(min_sizes, out_pad))
    if any(s <= 0 for s in out_size):
        raise ValueError(
            f"Given input size per channel: {_sizes(in_size)}. Calculated output size per channel: "
            f"{_sizes(out_size)}. Output size is too small"
        )
    # The conv whose input gradient this is: conv input = our output.
    geom = ConvGeometry(
        out_per_group * groups,
        in_channels,
        groups,
        out_size,
        tuple(kernel),
        in_size,
        stride,
        dilation,
        pairs,
        "zeros",
        conv_mode,
        compute_mode,
    )
    return geom, batched
