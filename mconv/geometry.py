"""``ConvGeometry``: one frozen, validated description of a convolution.

Every public entry point (functional ops, layers) builds a geometry once
from user arguments (``conv_geometry``: one builder for conv and transposed
conv); backends receive only canonical values from it.

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

Padding is per-dimension ``(before, after)``; a negative amount crops the
conv input (``lax.conv_general_dilated``'s meaning; for a transposed conv,
whose output is that input, it adds zero borders). ``'same'`` and
``'same_lower'`` are resolved per input size as TensorFlow, JAX ``'SAME'``
and ONNX ``SAME_UPPER``/``SAME_LOWER`` do: output size ``ceil(S / stride)``
(transposed: ``S * stride``), the odd element of the padding after
(``'same'``) or before (``'same_lower'``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from . import _args
from ._args import shape_str


def is_depthwise(groups: int, in_channels: int) -> bool:
    """A depthwise convolution: one input channel per group (C = G > 1), any multiplier."""
    return groups > 1 and groups == in_channels


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

    @property
    def depthwise(self) -> bool:
        """One input channel per group (C = G > 1), any channel multiplier O/G."""
        return is_depthwise(self.groups, self.in_channels)

    @property
    def pointwise(self) -> bool:
        """A 1x...x1 kernel at stride 1 without padding over an input as large as the output:
        the input already is its own column matrix. (A transposed conv's output_padding can
        make the conv input one larger than its output.)"""
        return (
            all(k == 1 for k in self.kernel_size)
            and all(s == 1 for s in self.stride)
            and all(p == (0, 0) for p in self.padding)
            and self.in_size == self.out_size
        )

    @property
    def crops(self) -> tuple[tuple[int, int], ...]:
        """What negative padding cuts from each end of the conv input: ``(before, after)``."""
        return tuple((max(-lo, 0), max(-hi, 0)) for lo, hi in self.padding)

    def cropped(self) -> "ConvGeometry":
        """The geometry that runs on the input with ``crops`` cut off (padding >= 0)."""
        in_size = tuple(s - a - b for s, (a, b) in zip(self.in_size, self.crops))
        padding = tuple((max(lo, 0), max(hi, 0)) for lo, hi in self.padding)
        return replace(self, in_size=in_size, padding=padding)


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


def _split(total: int, lower: bool) -> tuple[int, int]:
    """A total padding as (before, after): the odd element after, or before for 'same_lower'."""
    small = total // 2  # floor: a negative total (a transposed conv's crop) splits the same way
    return (total - small, small) if lower else (small, total - small)


def resolve_padding(
    padding: Any,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    in_size: Sequence[int] | None = None,
    transposed: bool = False,
    output_padding: Sequence[int] | None = None,
) -> tuple[tuple[int, int], ...]:
    """Any accepted padding form -> per-dimension (before, after) pairs.

    ``'same'``/``'same_lower'`` depend on the input size: output ``ceil(S / stride)`` for a
    conv (with stride 1 this is PyTorch's 'same'), ``S * stride`` for a transposed conv.

    >>> resolve_padding("same", (3,), (2,), (1,), in_size=(6,))
    ((0, 1),)
    >>> resolve_padding("same_lower", (4,), (1,), (1,), in_size=(5,))
    ((2, 1),)
    """
    n = len(kernel_size)
    pairs = _args.padding_pairs(padding, n, allow_negative=True)
    if pairs == "valid":
        return ((0, 0),) * n
    if isinstance(pairs, str):
        if in_size is None:
            raise ValueError(f"padding={pairs!r} needs the input size")
        op = (0,) * n if output_padding is None else output_padding
        result = []
        for s, k, st, d, p in zip(in_size, kernel_size, stride, dilation, op):
            effective = d * (k - 1) + 1
            if transposed:  # output s * stride
                total = st * (s - 1) + p + effective - s * st
            else:  # output ceil(s / stride)
                total = max((-(-s // st) - 1) * st + effective - s, 0)
            result.append(_split(total, lower=pairs == "same_lower"))
        return tuple(result)
    return pairs


def check_padding_mode(padding_mode: Any, transposed: bool, n: int) -> str:
    """A padding mode a conv (any) or a transposed conv ('zeros' only) accepts."""
    padding_mode = _args.choice(padding_mode, _args.PADDING_MODES, "padding_mode")
    if transposed and padding_mode != "zeros":
        raise ValueError(
            f'Only "zeros" padding mode is supported for ConvTranspose{n}d, but got '
            f"padding_mode={padding_mode!r}"
        )
    return padding_mode


_MODE_LIMITS = {
    "reflect": "padding_mode='reflect' needs padding < input size in every dimension, but got "
    "padding ({lo}, {hi}) for spatial dimension {dim} of input {shape}",
    "circular": "padding_mode='circular' needs padding <= input size in every dimension (it may "
    "wrap around only once), but got padding ({lo}, {hi}) for spatial dimension {dim} of input "
    "{shape}",
    "replicate": "padding_mode='replicate' needs a non-empty input, but got input {shape}",
}


def _check_pads(mode: str, pairs, conv_in_size, input_shape, transposed: bool) -> None:
    """PyTorch's limits on padding modes (``_args.pad_fits``, with the conv's wording), and
    crops that leave something of the conv input."""
    for dim, ((lo, hi), size) in enumerate(zip(pairs, conv_in_size)):
        if (lo < 0 or hi < 0) and mode != "zeros":
            raise ValueError(
                f"negative padding (a crop) needs padding_mode='zeros', but got "
                f"padding_mode={mode!r} with padding {tuple(pairs)}"
            )
        if size - max(-lo, 0) - max(-hi, 0) < 1:
            what = "output" if transposed else "input"
            raise ValueError(
                f"negative padding (a crop) must leave some of the conv {what}, but got padding "
                f"({lo}, {hi}) for spatial dimension {dim} of size {size} (input "
                f"{shape_str(input_shape)})"
            )
        if not _args.pad_fits(mode, lo, hi, size):
            raise ValueError(
                _MODE_LIMITS[mode].format(lo=lo, hi=hi, dim=dim, shape=shape_str(input_shape))
            )


def _transpose_output_padding(
    output_padding, output_size, in_size, batched, min_sizes, stride, dilation, n
) -> tuple[int, ...]:
    """PyTorch's ``_output_padding``: output_size wins over output_padding."""
    if output_size is None:
        return _check_output_padding(output_padding, stride, dilation, n)
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


def _check_output_padding(output_padding, stride, dilation, n) -> tuple[int, ...]:
    op = _args.int_tuple(output_padding, n, "output_padding", minimum=0)
    if any(p >= s and p >= d for p, s, d in zip(op, stride, dilation)):
        raise ValueError(
            f"output padding must be smaller than either stride or dilation, but got "
            f"output_padding={op}, stride={stride}, dilation={dilation}"
        )
    return op


def conv_geometry(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    transposed: bool = False,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    dilation: Any = 1,
    groups: Any = 1,
    output_size: Any = None,
    padding_mode: str = "zeros",
    conv_mode: str = "cross_correlation",
    compute_mode: str = "default",
    op: str | None = None,
) -> tuple[ConvGeometry, bool]:
    """Validate a convolution (or, ``transposed``, a transposed-convolution) call; return its
    geometry and whether the input was batched. ``output_padding`` and ``output_size``
    belong to transposed convolutions.

    Output size per dimension, ``(before, after)`` the padding pair:
    conv ``floor((S + before + after - dilation*(k-1) - 1) / stride) + 1``, transposed
    ``(S - 1)*stride - before - after + dilation*(k-1) + output_padding + 1``.
    """
    op = op or ("conv_transpose" if transposed else "conv")
    layout = "in_channels, out_channels" if transposed else "out_channels, in_channels"
    n = _check_weight(weight_shape, op, f"({layout}/groups, *kernel_size)")
    batched_shape, batched = _split_batch(input_shape, n, op)
    groups = _check_groups(groups, weight_shape)
    lead, per_group, *kernel = (int(s) for s in weight_shape)
    channels = batched_shape[1]
    expected = lead if transposed else per_group * groups
    if channels != expected:
        given = "transposed=1" if transposed else f"groups={groups}"
        raise ValueError(
            f"Given {given}, weight of size {shape_str(weight_shape)}, expected "
            f"input{shape_str(batched_shape)} to have {expected} channels, but got "
            f"{channels} channels instead"
        )
    stride = _args.int_tuple(stride, n, "stride", minimum=1)
    dilation = _args.int_tuple(dilation, n, "dilation", minimum=1)
    padding_mode = check_padding_mode(padding_mode, transposed, n)
    conv_mode = _args.choice(conv_mode, _args.CONV_MODES, "conv_mode")
    compute_mode = _args.choice(compute_mode, _args.COMPUTE_MODES, "compute_mode")
    in_size = tuple(int(s) for s in batched_shape[2:])
    effective = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if not transposed:
        pairs = resolve_padding(padding, kernel, stride, dilation, in_size)
        _check_pads(padding_mode, pairs, in_size, input_shape, transposed)
        padded = [s + lo + hi for s, (lo, hi) in zip(in_size, pairs)]
        if any(p < e for p, e in zip(padded, effective)):
            raise ValueError(
                f"Calculated padded input size per channel: {_sizes(padded)}. Kernel size: "
                f"{_sizes(effective)}. Kernel size can't be greater than actual input size"
            )
        out_size = tuple((p - e) // s + 1 for p, e, s in zip(padded, effective, stride))
        geom = ConvGeometry(channels, lead, groups, in_size, tuple(kernel), out_size, stride,
                            dilation, pairs, padding_mode, conv_mode, compute_mode)  # fmt: skip
        return geom, batched
    if isinstance(padding, str) and padding != "valid":  # 'same': the output size is set
        if output_size is not None:
            raise ValueError(
                f"output_size cannot be combined with padding={padding!r} (which sets the "
                f"output size to input size * stride), but got output_size={output_size!r}"
            )
        out_pad = _check_output_padding(output_padding, stride, dilation, n)
        pairs = resolve_padding(padding, kernel, stride, dilation, in_size, True, out_pad)
    else:
        pairs = resolve_padding(padding, kernel, stride, dilation)
        min_sizes = tuple(
            (i - 1) * s - lo - hi + e for i, s, (lo, hi), e in zip(in_size, stride, pairs, effective)
        )
        out_pad = _transpose_output_padding(
            output_padding, output_size, in_size, batched, min_sizes, stride, dilation, n
        )
    out_size = tuple(
        (i - 1) * s - lo - hi + e + p
        for i, s, (lo, hi), e, p in zip(in_size, stride, pairs, effective, out_pad)
    )
    if any(s <= 0 for s in out_size):
        raise ValueError(
            f"Given input size per channel: {_sizes(in_size)}. Calculated output size per channel: "
            f"{_sizes(out_size)}. Output size is too small"
        )
    _check_pads(padding_mode, pairs, out_size, input_shape, transposed)
    # The conv whose input gradient this is: conv input = our output.
    geom = ConvGeometry(per_group * groups, lead, groups, out_size, tuple(kernel), in_size, stride,
                        dilation, pairs, "zeros", conv_mode, compute_mode)  # fmt: skip
    return geom, batched


def conv_transpose_geometry(input_shape, weight_shape, **options) -> tuple[ConvGeometry, bool]:
    """``conv_geometry(..., transposed=True)``."""
    return conv_geometry(input_shape, weight_shape, transposed=True, **options)
