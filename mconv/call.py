"""``ConvCall``: one validated convolution call, built once at the edge.

Every entry point (``mconv.functional``, the ``nn`` layers, the parallel layers) turns its
arguments into a ``ConvCall`` with ``conv_call``: the option names, array types, dtypes,
devices, bias size and rank are checked, and the geometry built (``mconv.geometry``).
``mconv.conv_ops`` then computes forward, backward and JVP from the call alone: whether
it is a transposed convolution is data here, not a second family of functions.

>>> import numpy as np
>>> call = conv_call("conv", np.ones((2, 3, 8)), np.ones((4, 3, 3)), None, dict(stride=2))
>>> call.transposed, call.has_bias, call.output_shape(2)
(False, False, (2, 4, 3))
"""

from __future__ import annotations

from dataclasses import dataclass
from . import _args
from ._args import shape_str
from .geometry import ConvGeometry, conv_geometry

CONV_OPTIONS = frozenset({"stride", "padding", "dilation", "groups", "padding_mode", "conv_mode",
                          "compute_mode"})  # fmt: skip
TRANSPOSE_OPTIONS = CONV_OPTIONS | {"output_padding", "output_size"}


@dataclass(frozen=True)
class ConvCall:
    """A convolution (``transposed=False``) or transposed convolution of ``geom``, with or
    without a bias; ``batched``: whether the input had a batch axis."""

    geom: ConvGeometry
    transposed: bool
    has_bias: bool
    batched: bool = True

    def output_shape(self, batch: int) -> tuple[int, ...]:
        """The op's output (B, C, *S): the conv output, or for a transposed conv the conv input."""
        geom = self.geom
        return geom.input_shape(batch) if self.transposed else geom.output_shape(batch)

    @property
    def out_channels(self) -> int:
        return self.geom.in_channels if self.transposed else self.geom.out_channels

    def batch(self, a):
        """(C, *S) -> (1, C, *S) for an unbatched call; None stays None."""
        return a if self.batched or a is None else a[None]

    def unbatch(self, a):
        return a if self.batched or a is None else a[0]


def check_like(op: str, name: str, value, expected_shape, dtype, device: str | None = None) -> None:
    """A gradient or tangent must have exactly the shape and dtype it stands for."""
    _args.check_array(value, name, op)
    if tuple(value.shape) != tuple(expected_shape):
        raise ValueError(
            f"{op}: expected {name} of size {shape_str(expected_shape)}, but got "
            f"{name} of size {shape_str(value.shape)}"
        )
    if value.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, but got {name}.dtype={value.dtype}")
    if device is not None and _args.device_of(value) != device:
        raise ValueError(
            f"{op}: {name} must be on {device}, but got {name} on {_args.device_of(value)}"
        )


def conv_call(
    op: str,
    x,
    weight,
    bias,
    options: dict,
    *,
    transposed: bool = False,
    rank: int | None = None,
    has_bias: bool | None = None,
) -> ConvCall:
    """Validate one call; ``options`` are the keyword arguments of ``F.conv`` (or, transposed,
    ``F.conv_transpose``), ``rank`` the spatial rank a conv{rank}d requires, ``has_bias``
    (default: ``bias is not None``) whether a bias gradient is wanted."""
    unknown = sorted(set(options) - (TRANSPOSE_OPTIONS if transposed else CONV_OPTIONS))
    if unknown:
        raise TypeError(f"{op}() got an unexpected keyword argument {unknown[0]!r}")
    _args.check_array(x, "input", op)
    _args.check_array(weight, "weight", op)
    if bias is not None:
        _args.check_array(bias, "bias", op)
    _args.check_same_dtype(op, input=x, weight=weight, bias=bias)
    _args.check_same_device(op, input=x, weight=weight, bias=bias)
    if rank is not None and weight.ndim != rank + 2:
        raise ValueError(
            f"{op} expects a {rank + 2}-D weight (out_channels, in_channels/groups, {rank} "
            f"kernel dims), but got weight of size {shape_str(weight.shape)}"
        )
    groups = options.get("groups", 1)
    if bias is not None and weight.ndim >= 3 and (not transposed or _args.is_int(groups)):
        channels = weight.shape[1] * groups if transposed else weight.shape[0]
        if tuple(bias.shape) != (channels,):
            raise ValueError(
                f"Given weight of size {shape_str(weight.shape)}, expected bias to be "
                f"1-dimensional with {channels} elements, but got bias of size "
                f"{shape_str(bias.shape)} instead"
            )
    geom, batched = conv_geometry(x.shape, weight.shape, transposed=transposed, op=op, **options)
    has_bias = bias is not None if has_bias is None else _args.check_bool(has_bias, "has_bias")
    return ConvCall(geom, transposed, has_bias, batched)


def check_grad(op: str, call: ConvCall, dy, x) -> None:
    """``dy`` must be the gradient of the op's output for input ``x`` (as given: batched or
    not)."""
    shape = call.output_shape(x.shape[0] if call.batched else 1)
    expected = shape if call.batched else shape[1:]
    check_like(op, "grad_output", dy, expected, x.dtype, _args.device_of(x))


def check_tangents(op: str, call: ConvCall, x, weight, dx, dweight, dbias) -> None:
    for name, tangent, primal in (("dx", dx, x), ("dweight", dweight, weight)):
        if tangent is not None:
            check_like(op, name, tangent, primal.shape, primal.dtype, _args.device_of(primal))
    if dbias is not None:
        check_like(op, "dbias", dbias, (call.out_channels,), x.dtype, _args.device_of(x))
