"""``ShardedConv``: the base of every parallel convolution layer.

A parallel layer is built from the serial layer it stands for: it builds
that layer (so every argument is validated once, by the core, and the
initialisation draws exactly what the serial layer draws), keeps this
rank's slice of its weight and bias as its own Parameters, and discards it.
Its compute is ``mconv.functional`` on the local shard; the subclasses add
only the communication. So, with the same ``mconv.manual_seed`` on every
rank, the shards are exactly the slices of the serial layer built with
that seed.

``shard_axes`` says how each parameter is split across ``comm`` (axis, or
None when every rank holds all of it); ``full_shapes`` the serial shapes.
``parallel.gather_state_dict`` and ``scatter_state_dict`` read both.
"""

from __future__ import annotations

import inspect
from typing import Any

from mconv import _args
from mconv import functional as F
from mconv.nn.module import Module, Parameter

from .comm import Communicator
from .sharding import shard_range


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, but got {name}={value!r}")
    return value


def _comparable(key: str, value: Any) -> str:
    """What must agree across ranks: every argument, except which GPU (each rank its own)."""
    if key == "device" and isinstance(value, str) and value.startswith("cuda"):
        return "'cuda'"
    return repr(value)


class ShardedConv(Module):
    """Base class; subclasses set ``_serial`` (an ``mconv.nn`` conv class) and ``shard_axes``."""

    _serial: type
    shard_axes: dict[str, int | None] = {}

    def __init__(self, *args: Any, comm: Any, flags: dict[str, bool], **kwargs: Any):
        super().__init__()
        name = type(self).__name__
        if not isinstance(comm, Communicator):
            raise TypeError(
                f"{name}: comm must be a parallel.Communicator (from parallel.init()), but got "
                f"{type(comm).__name__}"
            )
        bound = inspect.signature(self._serial).bind(*args, **kwargs)
        bound.apply_defaults()
        flags = {key: _flag(value, key) for key, value in flags.items()}
        config = tuple((key, _comparable(key, value)) for key, value in bound.arguments.items())
        comm.check_same((name,) + config + tuple(flags.items()), f"{name}'s configuration")
        self.comm = comm
        for key, value in flags.items():
            object.__setattr__(self, key, value)
        full = self._serial(*args, **kwargs)
        self._check_split(full)
        self.in_channels, self.out_channels = full.in_channels, full.out_channels
        self.kernel_size, self.groups = full.kernel_size, full.groups
        self._rank_n = len(full.kernel_size)
        self._full_repr = full.extra_repr()
        self.full_shapes = {"weight": full.weight.shape}
        if full.bias is not None:
            self.full_shapes["bias"] = full.bias.shape
        self._options = dict(
            stride=full.stride,
            padding=bound.arguments["padding"],
            dilation=full.dilation,
            groups=self._local_groups(full),
            padding_mode=full.padding_mode,
            conv_mode=full.conv_mode,
            compute_mode=full.compute_mode,
        )
        if full.transposed:
            self._options["output_padding"] = full.output_padding
        self.weight = Parameter(self._take(full.weight.data, self.shard_axes["weight"]))
        self.bias = (
            None
            if full.bias is None
            else Parameter(self._take(full.bias.data, self.shard_axes["bias"]))
        )
        self._cache = None

    # -- what subclasses override -----------------------------------------------------------
    def _check_split(self, full) -> None:
        """Raise ValueError when ``full`` cannot be split evenly over ``comm``."""

    def _local_groups(self, full) -> int:
        return full.groups

    # -- helpers ------------------------------------------------------------------------------
    def _divisible(self, value: int, name: str, what: str) -> None:
        if value % self.comm.size:
            raise ValueError(
                f"{type(self).__name__}: {name} must be divisible by the number of ranks of comm "
                f"({self.comm.size}) to split {what}, but got {name}={value}"
            )

    def _block(self, n: int) -> slice:
        """This rank's block of ``n`` channels (even split, rank order)."""
        block = shard_range(n, self.comm)
        return slice(block.start, block.stop)

    def _take(self, array, axis: int | None):
        if axis is None:
            return array.copy()
        index = [slice(None)] * array.ndim
        index[axis] = self._block(array.shape[axis])
        return array[tuple(index)].copy()

    def _channel_axis(self, x) -> int:
        """1 for batched ``(B, C, *S)`` input, 0 for unbatched ``(C, *S)`` (after checking x)."""
        name = type(self).__name__
        _args.check_array(x, "input", name)
        _args.check_same_dtype(name, input=x, weight=self.weight.data)
        n = self._rank_n
        if x.ndim not in (n + 1, n + 2):
            raise ValueError(
                f"{name}: expected a {n + 1}-D (unbatched) or {n + 2}-D (batched) input, but got "
                f"input of size {_args.shape_str(x.shape)}"
            )
        return 1 if x.ndim == n + 2 else 0

    def _check_channels(self, x, axis: int, expected: int, what: str) -> None:
        if x.shape[axis] != expected:
            raise ValueError(
                f"{type(self).__name__}: expected input with {expected} channels ({what}), but "
                f"got input of size {_args.shape_str(x.shape)}"
            )

    def _cached(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        return self._cache

    def _check_grad(self, dy, shape, dtype) -> None:
        F.check_like(f"{type(self).__name__}.backward", "grad_output", dy, shape, dtype)

    @staticmethod
    def _slice_axis(array, axis: int, block: slice):
        index = [slice(None)] * array.ndim
        index[axis] = block
        return array[tuple(index)]

    # -- the channel-block communication the layers share -----------------------------------
    def _local_input(self, x):
        """(this rank's channel block of ``x``, the channel axis); with ``input_is_sharded``
        x is that block already."""
        axis = self._channel_axis(x)
        if self.input_is_sharded:
            self._check_channels(x, axis, self.in_channels // self.comm.size, "this rank's shard")
            return x, axis
        self._check_channels(x, axis, self.in_channels, "the full input")
        return self._slice_axis(x, axis, self._block(self.in_channels)), axis

    def _input_grad(self, dx_local, axis: int):
        """dx of the kind forward's input was: this rank's block, or all blocks gathered."""
        if self.input_is_sharded:
            return dx_local
        return self.comm.allgather(dx_local, axis=axis, check=False)

    def _output(self, y_local, axis: int):
        """This rank's block of y, or (``gather_output``) all blocks gathered."""
        if self.gather_output:
            return self.comm.allgather(y_local, axis=axis, check=False)
        return y_local

    def _local_grad(self, dy, local_shape, axis: int, dtype):
        """This rank's block of dy, checked against the output forward returned."""
        if not self.gather_output:
            self._check_grad(dy, local_shape, dtype)
            return dy
        full = list(local_shape)
        full[axis] = self.out_channels
        self._check_grad(dy, full, dtype)
        return self._slice_axis(dy, axis, self._block(self.out_channels))

    # -- the local computation (mconv.functional on the shard) -------------------------------
    def _conv(self, x, bias, output_size=None):
        if "output_padding" in self._options:
            return F.conv_transpose(
                x, self.weight.data, bias, output_size=output_size, **self._options
            )
        return F.conv(x, self.weight.data, bias, **self._options)

    def _conv_backward(self, dy, x, has_bias: bool, output_size=None):
        """dx of the local conv; accumulates weight.grad (and bias.grad when ``has_bias``)."""
        if "output_padding" in self._options:
            dx, dw, db = F.conv_transpose_backward(
                dy,
                x,
                self.weight.data,
                has_bias=has_bias,
                output_size=output_size,
                **self._options,
            )
        else:
            dx, dw, db = F.conv_backward(
                dy, x, self.weight.data, has_bias=has_bias, **self._options
            )
        self.weight.accumulate_grad(dw)
        if has_bias:
            self.bias.accumulate_grad(db)
        return dx

    def extra_repr(self) -> str:
        flags = ", ".join(
            f"{key}={getattr(self, key)}"
            for key in ("input_is_sharded", "gather_output")
            if key in self.__dict__
        )
        return f"{self._full_repr}, rank={self.comm.rank}/{self.comm.size}, {flags}"
