"""Losses that return both the value and the gradient with respect to the logits.

>>> import numpy as np
>>> loss, grad = cross_entropy(np.zeros((2, 4)), np.array([0, 3]))
>>> round(float(loss), 4), grad.shape
(1.3863, (2, 4))
"""

from __future__ import annotations

import numpy as np

from . import _args
from ._args import array_module


def cross_entropy(logits, target, reduction: str = "mean"):
    """Softmax cross-entropy of ``logits`` (B, K) against class indices ``target`` (B,).

    Returns ``(loss, dlogits)``; ``reduction`` is ``'mean'`` or ``'sum'``, as in PyTorch.
    On a GPU both live on the logits' device (``target`` may be on the host).
    """
    _args.check_array(logits, "logits", "cross_entropy")
    reduction = _args.choice(reduction, ("mean", "sum"), "reduction")
    xp = array_module(logits)
    target = xp.asarray(target)  # class indices on the logits' device
    if logits.ndim != 2:
        raise ValueError(
            f"cross_entropy: logits must be (batch, classes), but got logits of size "
            f"{_args.shape_str(logits.shape)}"
        )
    if not np.issubdtype(target.dtype, np.integer):
        raise TypeError(
            f"cross_entropy: target must hold integer class indices, but got "
            f"target.dtype={target.dtype}"
        )
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: expected target of size {_args.shape_str(logits.shape[:1])}, "
            f"but got target of size {_args.shape_str(target.shape)}"
        )
    classes = logits.shape[1]
    if target.size and (target.min() < 0 or target.max() >= classes):
        raise ValueError(
            f"cross_entropy: target values must lie in [0, {classes}), but got values in "
            f"[{target.min()}, {target.max()}]"
        )
    z = logits.astype(np.float64) if logits.dtype == np.float64 else logits.astype(np.float32)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    rows = xp.arange(logits.shape[0])
    loss = -log_probs[rows, target].sum()
    grad = xp.exp(log_probs)
    grad[rows, target] -= 1.0
    if reduction == "mean":
        scale = 1.0 / max(logits.shape[0], 1)
        loss, grad = loss * scale, grad * scale
    return loss.astype(logits.dtype), grad.astype(logits.dtype)
