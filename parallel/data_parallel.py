"""``DataParallel``: replicate a model, average its gradients over ranks.

Each rank runs the whole model on its own part of the global batch. At
construction rank 0's parameters are broadcast, so every replica starts
equal; ``backward`` runs the model's backward and then averages every
gradient over ``comm``. With a mean loss and equal local batches the
averaged gradient is the gradient of the global batch, so training equals
serial training on the global batch (up to the order of fp additions).

Gradients travel in buckets: flat buffers of at most ``bucket_mb`` MiB
(one dtype each; fp16 buckets are fp32 on the wire), filled in sorted
parameter-name order, one allreduce per bucket (and one small allreduce of
which parameters have a grad). A parameter whose grad is None on some
ranks counts as zeros there; one whose grad is None on every rank (unused,
or frozen) keeps None, so optimizers skip it as they would serially. The
buckets follow the parameters: after ``model.to(dtype)`` or ``.to('cuda')``
they are rebuilt (on every rank; ranks that disagree raise).

Buffers (BatchNorm's running statistics) are broadcast from rank 0 before
every forward in training mode (``broadcast_buffers=True``, as PyTorch's
DistributedDataParallel does), so the replicas keep one model; with
SyncBatchNorm they are equal anyway.

>>> import numpy as np, mconv, parallel
>>> from mconv import nn
>>> comm = parallel.init()
>>> model = parallel.DataParallel(nn.Sequential(nn.Linear(3, 2)), comm)
>>> y = model(np.ones((4, 3), dtype=np.float32))
>>> _ = model.backward(np.ones_like(y))
>>> model.module[0].weight.grad.shape
(2, 3)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from mconv import _args
from mconv._args import array_module
from mconv.precision import accumulator
from mconv.nn.module import Module

from .comm import Communicator


class _Bucket:
    """Parameters of one dtype laid out in one flat buffer."""

    def __init__(self, dtype: np.dtype, xp):
        self.dtype, self.xp = dtype, xp
        self.wire = accumulator(dtype)
        self.entries: list[tuple[Any, int, int]] = []  # (param, offset, size)
        self.size = 0

    def add(self, param) -> None:
        self.entries.append((param, self.size, param.data.size))
        self.size += param.data.size

    def nbytes_with(self, param) -> int:
        return (self.size + param.data.size) * self.wire.itemsize


class DataParallel(Module):
    """Wraps ``module``; ``backward`` returns with gradients averaged over ``comm``.

    ``forward`` is the module's; the module is the child ``module`` (state
    dict keys start with ``module.``, as in PyTorch). In a hybrid grid pass
    the ``data_comm`` of ``comm.grid(...)``.
    """

    def __init__(self, module: Module, comm: Communicator, bucket_mb: float = 25,
                 broadcast_buffers: bool = True):  # fmt: skip
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(
                f"DataParallel: module must be an nn.Module, but got {type(module).__name__}"
            )
        if not isinstance(comm, Communicator):
            raise TypeError(
                f"DataParallel: comm must be a parallel.Communicator (from parallel.init()), but "
                f"got {type(comm).__name__}"
            )
        comm.check_same(repr(bucket_mb), "DataParallel(bucket_mb=...)")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)):
            raise TypeError(
                f"DataParallel: bucket_mb must be a number, but got bucket_mb={bucket_mb!r}"
            )
        if not (bucket_mb > 0 and math.isfinite(bucket_mb)):
            raise ValueError(
                f"DataParallel: bucket_mb must be a finite number > 0, but got "
                f"bucket_mb={bucket_mb!r}"
            )
        named = sorted(module.named_parameters(), key=lambda item: item[0])
        signature = [(name, tuple(p.shape), np.dtype(p.dtype).name) for name, p in named]
        comm.check_same(signature, "DataParallel: the model's parameters (name, shape, dtype)")
        self.module = module
        self.comm = comm
        self.bucket_mb = bucket_mb
        self.broadcast_buffers = _args.check_bool(broadcast_buffers, "broadcast_buffers")
        comm.check_same(self.broadcast_buffers, "DataParallel(broadcast_buffers=...)")
        self._bucket_bytes = int(bucket_mb * 2**20)
        self.require_sync = True
        self._params = [p for _, p in named]
        self._layout, self._buckets = None, []
        self.broadcast_parameters(root=0)

    @staticmethod
    def _make_buckets(params, limit: int) -> list[_Bucket]:
        """Per dtype (and device), consecutive parameters until a bucket would exceed ``limit``
        bytes."""
        buckets: list[_Bucket] = []
        open_bucket: dict[tuple, _Bucket] = {}
        for param in params:
            xp = array_module(param.data)
            key = (np.dtype(param.dtype), xp.__name__)
            bucket = open_bucket.get(key)
            if bucket is None or (bucket.size and bucket.nbytes_with(param) > limit):
                bucket = open_bucket[key] = _Bucket(key[0], xp)
                buckets.append(bucket)
            bucket.add(param)
        return buckets

    def _current_buckets(self) -> list[_Bucket]:
        """The buckets for the parameters' current dtypes and devices (rebuilt when those
        changed: collective)."""
        layout = [(np.dtype(p.dtype).str, array_module(p.data).__name__) for p in self._params]
        if layout != self._layout:
            self.comm.check_same(layout, "DataParallel: the parameters' dtypes and devices")
            self._buckets = self._make_buckets(self._params, self._bucket_bytes)
            self._layout = layout
        return self._buckets

    @property
    def bucket_sizes(self) -> list[int]:
        """Elements per bucket, in the order they are reduced (local: not collective)."""
        return [b.size for b in self._make_buckets(self._params, self._bucket_bytes)]

    def broadcast_parameters(self, root: int = 0) -> None:
        """Overwrite every replica's parameters with ``root``'s."""
        if self.comm.size == 1:
            return
        for bucket in self._current_buckets():
            flat = bucket.xp.empty(bucket.size, dtype=bucket.dtype)
            for param, offset, size in bucket.entries:
                flat[offset : offset + size] = param.data.reshape(-1)  # (size,)
            self.comm.broadcast_into(flat, root)
            for param, offset, size in bucket.entries:
                param.data[...] = flat[offset : offset + size].reshape(param.shape)  # param.shape

    def allreduce_gradients(self) -> None:
        """Average every parameter's grad over ``comm`` (None counts as zeros; None on every
        rank stays None)."""
        buckets = self._current_buckets()
        has_grad = np.array([p.grad is not None for p in self._params], dtype=np.uint8)  # host
        if self.comm.size > 1:
            has_grad = self.comm.allreduce(has_grad, "max")
        used = {id(p) for p, flag in zip(self._params, has_grad) if flag}
        for bucket in buckets:
            flat = bucket.xp.zeros(bucket.size, dtype=bucket.wire)
            for param, offset, size in bucket.entries:
                if param.grad is not None:
                    flat[offset : offset + size] = param.grad.reshape(-1)  # (size,)
            if self.comm.size > 1:
                self.comm.allreduce(flat, "mean", out=flat)
            for param, offset, size in bucket.entries:
                if id(param) in used:
                    grad = flat[offset : offset + size].reshape(param.shape)  # param.shape
                    param.grad = grad.astype(bucket.dtype)  # a copy: the buffer is not kept

    @contextlib.contextmanager
    def no_sync(self):
        """Inside, ``backward`` only accumulates local grads (gradient accumulation)."""
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.broadcast_buffers and self.training and self.comm.size > 1:
            for _, buffer in self.module.named_buffers():
                self.comm.broadcast_into(buffer, 0)
        return self.module(*args, **kwargs)

    def backward(self, grad_output: Any) -> Any:
        """The module's input gradient; parameters' grads averaged over ranks."""
        grad_input = self.module.backward(grad_output)
        if self.require_sync:
            self.allreduce_gradients()
        return grad_input

    def extra_repr(self) -> str:
        return (
            f"ranks={self.comm.size}, buckets={len(self.bucket_sizes)}, bucket_mb={self.bucket_mb}"
        )
