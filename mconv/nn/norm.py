"""Batch normalisation with PyTorch's signature, state_dict keys and semantics.

Per channel c (axis 1), over every other axis (n values):

    training:  y = (x - mean) / sqrt(var + eps) * weight + bias,  var biased (/ n);
               running_mean <- (1 - f) running_mean + f mean,
               running_var  <- (1 - f) running_var + f var * n / (n - 1)   (unbiased),
               f = momentum, or 1 / num_batches_tracked when momentum is None
    eval:      the same with running_mean / running_var (when track_running_stats)

Gradients (xhat the normalised input, g = weight or 1):

    batch statistics:  dx = g / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat))
    running ones:      dx = g / sqrt(var + eps) * dy
    dweight = sum(dy * xhat), dbias = sum(dy)

Computed as PyTorch's CPU kernels do: the batch's sums (of x, of squared deviations from
the mean) in float64, rounded to the accumulator (fp32 for fp16); ``inv_std`` from them in
float64 (from the running variance: in the accumulator); the running averages in the
accumulator; the output the per-channel ``fma(x, alpha, beta)`` with ``alpha = inv_std *
weight`` and ``beta = fma(-mean, alpha, bias)``, rounded once (``backends/numpy_elementwise``).
So float32 eval outputs equal torch's bit for bit; in training, where the batch sums add in
another order, outputs and running statistics are within a few ulps. Buffers keep the
layer's dtype, as ``BatchNorm.half()`` does in PyTorch.
``_sums`` adds over the batch: ``parallel.SyncBatchNorm`` adds over ranks there too.

>>> import numpy as np
>>> from mconv import nn
>>> bn = nn.BatchNorm1d(2, dtype="float64")
>>> bn(np.array([[1.0, 2.0], [3.0, 6.0]]))
array([[-0.999995  , -0.99999875],
       [ 0.999995  ,  0.99999875]])
>>> bn.running_mean, int(bn.num_batches_tracked)
(array([0.2, 0.4]), 1)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _args
from .._args import array_module
from ..backends import numpy_elementwise
from ..precision import accumulator
from .module import Module, Parameter, cached, check_device, float_dtype, to_device


class _BatchNorm(Module):
    _dims: tuple[int, ...] = ()  # the input ranks this class takes

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype: Any = "float32",
                 device: str = "cpu"):  # fmt: skip
        super().__init__()
        self.num_features = _args.check_int(num_features, "num_features", minimum=1)
        self.eps = _args.check_number(eps, "eps", sign="positive")
        self.momentum = (
            None
            if momentum is None
            else _args.check_number(momentum, "momentum", sign="non-negative")
        )
        self.affine = _args.check_bool(affine, "affine")
        self.track_running_stats = _args.check_bool(track_running_stats, "track_running_stats")
        self.dtype, self.device = float_dtype(dtype), check_device(device)
        c, dt = self.num_features, self.dtype

        def on_device(a):  # host: initial values made here, then moved to the device
            return to_device(a, self.device)

        ones, zeros = np.ones(c, dt), np.zeros(c, dt)  # host: moved by on_device
        self.weight = Parameter(on_device(ones)) if self.affine else None
        self.bias = Parameter(on_device(zeros.copy())) if self.affine else None
        tracked = self.track_running_stats
        self.register_buffer("running_mean", on_device(zeros.copy()) if tracked else None)
        self.register_buffer("running_var", on_device(ones.copy()) if tracked else None)
        count = np.zeros((), np.int64)  # host: moved by on_device
        self.register_buffer("num_batches_tracked", on_device(count) if tracked else None)
        self._cache = None

    def on_shard(self, state: dict) -> "_BatchNorm":
        """The same layer over a block of channels: ``state`` (this layer's state_dict keys,
        each cut to the block) becomes its state. Used by ``parallel``'s sharded layers."""
        channels = next(iter(state.values())).shape[0] if state else self.num_features
        layer = type(self)(channels, self.eps, self.momentum, self.affine,
                           self.track_running_stats, self.dtype, self.device)  # fmt: skip
        layer.load_state_dict(state)
        return layer

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    # -- where the sums over the batch happen (SyncBatchNorm adds over ranks) ---------------
    def _sums(self, *arrays):
        """The given per-channel partial sums, summed over the whole batch (here: as they
        are). Each is (C,) in the accumulator."""
        return arrays

    def _check(self, x) -> tuple[int, ...]:
        name = type(self).__name__
        _args.check_array(x, "input", name)
        if x.ndim not in self._dims:
            shown = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"{name}: expected {shown} input (got {x.ndim}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected input with {self.num_features} channels (axis 1), but got "
                f"input of size {_args.shape_str(x.shape)}"
            )
        return (0, *range(2, x.ndim))

    def forward(self, x):
        axes = self._check(x)
        xp, acc = array_module(x), accumulator(x.dtype)
        shape = (1, -1) + (1,) * (x.ndim - 2)  # (C,) -> (1, C, 1, ...)
        batch_stats = self.training or not self.track_running_stats
        if batch_stats:
            wide = x.astype(acc, copy=False)
            local = wide.size // self.num_features
            count, total = self._sums(
                xp.full((1,), local, dtype=xp.float64), wide.sum(axis=axes, dtype=xp.float64)
            )
            n = float(count[0])
            if n <= 1 and self.training:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size "
                    f"{_args.shape_str(x.shape)}"
                )
            mean = (total / n).astype(acc)
            centred = wide - mean.reshape(shape)
            (square,) = self._sums((centred * centred).sum(axis=axes, dtype=xp.float64))
            square = square.astype(acc)  # the sum of squared deviations, in the accumulator
            if self.training and self.track_running_stats:
                self._update(mean, square, n)
            var = (square / acc.type(n)).astype(xp.float64)
            inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(acc)
        else:
            mean, var, n = self.running_mean.astype(acc), self.running_var.astype(acc), None
            inv_std = 1.0 / xp.sqrt(var + self.eps)
        # y = (x - mean) * inv_std * weight + bias as PyTorch's CPU kernel computes it: a
        # per-channel fma(x, alpha, beta) in the accumulator, rounded once
        alpha = inv_std * self.weight.data.astype(acc) if self.affine else inv_std
        bias = self.bias.data.astype(acc) if self.affine else xp.zeros_like(alpha)
        beta = numpy_elementwise.fma(-mean, alpha, bias, acc)
        y = numpy_elementwise.channel_affine(x, alpha, beta)
        self._cache = (x, mean, inv_std, n, x.dtype)  # backward makes xhat from them
        return y.astype(x.dtype, copy=False)

    def _update(self, mean, square, n: float) -> None:
        """Running statistics from the batch ``mean`` and sum of squared deviations
        ``square``, in their dtype (the accumulator) as PyTorch's CPU kernel updates them."""
        self.num_batches_tracked += 1
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        acc, dt = mean.dtype, self.running_mean.dtype
        keep, take = acc.type(1 - f), acc.type(f)  # (1 - f) and f rounded to the accumulator
        unbiased = square / acc.type(n - 1)
        self.running_mean[...] = (keep * self.running_mean.astype(acc) + take * mean).astype(dt)
        self.running_var[...] = (keep * self.running_var.astype(acc) + take * unbiased).astype(dt)

    def backward(self, grad_output):
        x, mean, inv_std, n, dtype = cached(self)
        axes = tuple(a for a in range(x.ndim) if a != 1)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        xhat = (x.astype(inv_std.dtype, copy=False) - mean.reshape(shape)) * inv_std.reshape(shape)
        dy = grad_output.astype(xhat.dtype, copy=False)
        local_dy, local_dy_xhat = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
        if self.affine:  # this rank's contribution (SyncBatchNorm: as torch's)
            self.weight.accumulate_grad(local_dy_xhat.astype(self.weight.dtype))
            self.bias.accumulate_grad(local_dy.astype(self.bias.dtype))
        scale = inv_std if not self.affine else inv_std * self.weight.data.astype(xhat.dtype)
        if n is None:  # running statistics: a per-channel affine map
            dx = dy * scale.reshape(shape)
        else:
            sum_dy, sum_dy_xhat = self._sums(local_dy, local_dy_xhat)
            dx = dy - (sum_dy / n).reshape(shape) - xhat * (sum_dy_xhat / n).reshape(shape)
            dx = dx * scale.reshape(shape)
        return dx.astype(dtype, copy=False)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """Over (B, C) or (B, C, L) inputs."""

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Over (B, C, H, W) inputs."""

    _dims = (4,)


class BatchNorm3d(_BatchNorm):
    """Over (B, C, D, H, W) inputs."""

    _dims = (5,)
