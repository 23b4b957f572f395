"""``Sharded`` (and ``ShardedConv``): a parallel layer is the serial layer on this rank's
shard, between two paired communication steps (``parallel.mappings``). Convolutions and
BatchNorm (``parallel.norm``) are built this way.

    forward:   x -> before.forward -> local(x) -> after.forward -> y
    backward:  dy -> after.backward -> local.backward -> before.backward -> dx

A parallel layer is built from the serial layer it stands for: it builds that layer (so
every argument is validated once, by the core, and the initialisation draws exactly what the
serial layer draws), keeps this rank's slice of its weight and bias as the local layer's
Parameters (``_ConvNd.on_shard``: the same layer class and options on a shard, nothing
drawn), and discards the rest. So, with the same ``mconv.manual_seed`` on every rank, the
shards are exactly the slices of the serial layer built with that seed. The local layer's
Parameters are the parallel layer's own (``weight``, ``bias``: its ``state_dict`` holds this
rank's shard under the serial layer's keys).

``shard_axes`` says how each parameter is split across ``comm`` (axis, or None when every
rank holds all of it); ``full_shapes`` the serial shapes. ``parallel.gather_state_dict`` and
``scatter_state_dict`` read both.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from mconv import _args
from mconv.call import check_like
from mconv.nn.module import Module, Parameter

from .comm import Communicator
from .mappings import NoComm
from .sharding import shard


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, but got {name}={value!r}")
    return value


def _comparable(key: str, value: Any) -> str:
    """What must agree across ranks: every argument, except which GPU (each rank its own)."""
    if key == "device" and isinstance(value, str) and value.startswith("cuda"):
        return "'cuda'"
    return repr(value)


class Sharded(Module):
    """Base class; subclasses set ``_serial`` (an ``mconv.nn`` layer class) and ``shard_axes``
    (state_dict name -> split axis; names not there are replicated), and say how to split
    (``_check_split``, ``_local_layer``) and communicate (``_steps``)."""

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
        self._describe(full)
        self._full_repr = full.extra_repr()
        state = full.state_dict()
        self.full_shapes = {name: tuple(a.shape) for name, a in state.items()}
        shards = {name: self._take(a, self.shard_axes.get(name)) for name, a in state.items()}
        local = self._local_layer(full, shards)
        object.__setattr__(self, "local", local)  # not a child: its state is ours
        object.__setattr__(self, "_buffers", local._buffers)  # one registry: to() moves both
        for name, param in local._parameters.items():
            setattr(self, name, param)
        if "bias" in shards and local._parameters.get("bias") is None:
            self.bias = Parameter(shards["bias"])  # added after the local layer (row-parallel)
        self.before, self.after = self._steps()
        self._cache = None

    @property
    def training(self) -> bool:
        """The local layer's mode (train()/eval() reach it though it is not a child)."""
        return self.__dict__["local"].training if "local" in self.__dict__ else True

    @training.setter
    def training(self, mode: bool) -> None:
        if "local" in self.__dict__:
            self.__dict__["local"].train(mode)

    # -- what subclasses say ----------------------------------------------------------------
    def _check_split(self, full) -> None:
        """Raise ValueError when ``full`` cannot be split evenly over ``comm``."""

    def _describe(self, full) -> None:
        """Copy what describes the serial layer (channels, ...) onto this one."""

    def _local_layer(self, full, shards: dict):
        """The serial layer on this rank's shard (``shards``: its state_dict, cut)."""
        raise NotImplementedError

    def _steps(self) -> tuple:
        """(before, after): the communication around the local layer."""
        return NoComm(self.comm), NoComm(self.comm)

    # -- helpers ------------------------------------------------------------------------------
    def _divisible(self, value: int, name: str, what: str) -> None:
        if value % self.comm.size:
            raise ValueError(
                f"{type(self).__name__}: {name} must be divisible by the number of ranks of comm "
                f"({self.comm.size}) to split {what}, but got {name}={value}"
            )

    def _take(self, array, axis: int | None):
        """This rank's block of a full parameter (a copy); all of it for ``axis=None``. The one
        rule for "rank r's block" of parameters (``parallel.shard``, a view, for arrays)."""
        return array.copy() if axis is None else shard(array, self.comm, axis).copy()

    def _channel_axis(self, x) -> int:
        """The channel axis of ``x`` (after checking it): 1, for batched input."""
        _args.check_array(x, "input", type(self).__name__)
        return 1

    def _check_ranks_agree(self, x, axis: int) -> None:
        """One small allreduce: every rank's input has one batch and spatial size (the
        channel axis left out), or every rank raises the same ValueError."""
        if self.comm.size == 1:
            return
        sizes = [d for i, d in enumerate(x.shape) if i != axis]
        if axis == 0:
            sizes.insert(0, -1)  # unbatched
        mine = np.array(sizes, dtype=np.int64)  # host: (1 + spatial rank,)
        extremes = self.comm.allreduce(np.concatenate([mine, -mine]), op="max")  # (max, -min)
        if (extremes[: mine.size] != -extremes[mine.size :]).any():  # then, on every rank:
            every = self.comm.allgather(mine[None], sizes=[1] * self.comm.size, check=False)
            shown = ", ".join(
                f"rank {r}: {'unbatched ' if row[0] < 0 else ''}{tuple(int(v) for v in row if v >= 0)}"
                for r, row in enumerate(every)
            )
            raise ValueError(
                f"{type(self).__name__}: every rank must pass input of the same batch and "
                f"spatial size (channels left out), but got {shown}"
            )

    def _expected_channels(self) -> tuple[int, str]:
        if getattr(self, "input_is_sharded", False):
            return self.in_channels // self.comm.size, "this rank's shard"
        return self.in_channels, "the full input"

    # -- the layer ----------------------------------------------------------------------------
    def forward(self, x, **extra):
        """before -> the local layer (``extra``: its forward's keyword arguments) -> after."""
        axis = self._channel_axis(x)
        expected, what = self._expected_channels()
        if x.shape[axis] != expected:
            raise ValueError(
                f"{type(self).__name__}: expected input with {expected} channels ({what}), but "
                f"got input of size {_args.shape_str(x.shape)}"
            )
        self._check_ranks_agree(x, axis)
        y = self.after.forward(self.local(self.before.forward(x, axis), **extra), axis)
        self._cache = (axis, y.shape, x.dtype)
        return y

    def backward(self, grad_output):
        """dx of the same kind (full or sharded) as forward's input; accumulates grads."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        axis, shape, dtype = self._cache
        check_like(f"{type(self).__name__}.backward", "grad_output", grad_output, shape, dtype)
        dy = self.after.backward(grad_output, axis)
        return self.before.backward(self.local.backward(dy), axis)

    def extra_repr(self) -> str:
        flags = ", ".join(
            f"{key}={getattr(self, key)}"
            for key in ("input_is_sharded", "gather_output")
            if key in self.__dict__
        )
        return f"{self._full_repr}, rank={self.comm.rank}/{self.comm.size}, {flags}"


class ShardedConv(Sharded):
    """A convolution on shards: the serial conv's options, this rank's rows or columns of its
    weight (``_ConvNd.on_shard``)."""

    def _describe(self, full) -> None:
        self.in_channels, self.out_channels = full.in_channels, full.out_channels
        self.kernel_size, self.groups = full.kernel_size, full.groups

    def _local_layer(self, full, shards: dict):
        return full.on_shard(shards["weight"], shards.get("bias"), full.groups)

    def _channel_axis(self, x) -> int:
        """1 for batched ``(B, C, *S)`` input, 0 for unbatched ``(C, *S)`` (after checking x)."""
        name = type(self).__name__
        _args.check_array(x, "input", name)
        _args.check_same_dtype(name, input=x, weight=self.weight.data)
        n = len(self.kernel_size)
        if x.ndim not in (n + 1, n + 2):
            raise ValueError(
                f"{name}: expected a {n + 1}-D (unbatched) or {n + 2}-D (batched) input, but got "
                f"input of size {_args.shape_str(x.shape)}"
            )
        return 1 if x.ndim == n + 2 else 0

    def options(self) -> dict:
        """The local (and serial) layer's keyword arguments of ``F.conv``/``F.conv_transpose``."""
        return self.local.options()
