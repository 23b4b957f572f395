"""Rounding error of mconv's float32 algorithms against torch float64 of the same inputs.

For a few layers it prints, for ``set_algorithm('exact')`` (the plain sum) and ``'fast'``
(Winograd where it applies), the largest error relative to the largest output and relative to
the largest sum of absolute products ``max(|x| * |w|)``, the scale cuDNN states its Winograd
error against.

    python -m benchmarks.algorithm_error

Needs torch (the ``test`` extra) and numba (for the fast path).
"""

from __future__ import annotations

import numpy as np
import torch

import mconv
from mconv import functional as F

LAYERS = [
    ("3x3 c64 56x56", (2, 64, 56, 56), (64, 64, 3, 3), "normal"),
    ("3x3 c256 14x14", (2, 256, 14, 14), (256, 256, 3, 3), "normal"),
    ("3x3 c512 7x7", (2, 512, 7, 7), (512, 512, 3, 3), "normal"),
    ("3x3 c64 28x28, after ReLU", (2, 64, 28, 28), (64, 64, 3, 3), "relu"),
    ("3x3 c64 28x28, inputs 10 + U(0,1)", (2, 64, 28, 28), (64, 64, 3, 3), "offset"),
    ("3x3x3 c32 8x28x28", (2, 32, 8, 28, 28), (32, 32, 3, 3, 3), "normal"),
]


def reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    conv = getattr(torch.nn.functional, f"conv{x.ndim - 2}d")
    return conv(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()


def inputs(shape, wshape, kind: str, rng) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(0, 1, shape) + 10 if kind == "offset" else rng.standard_normal(shape)
    x = np.maximum(x, 0) if kind == "relu" else x
    w = rng.standard_normal(wshape) / np.sqrt(np.prod(wshape[1:]))
    return x.astype(np.float32), w.astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(0)
    before = mconv.get_algorithm()
    print("| layer (float32, batch 2, N(0,1) inputs unless said) | exact: max err / max abs(y) "
          "| fast: max err / max abs(y) | exact: max err / max(abs(x) * abs(w)) "
          "| fast: max err / max(abs(x) * abs(w)) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    try:
        for name, shape, wshape, kind in LAYERS:
            x, w = inputs(shape, wshape, kind, rng)
            want = reference(x.astype(np.float64), w.astype(np.float64))
            scale = reference(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64)).max()
            errors = {}
            for algorithm in ("exact", "fast"):
                mconv.set_algorithm(algorithm)
                errors[algorithm] = np.abs(F.conv(x, w, padding=1) - want).max()
            top = np.abs(want).max()
            print(f"| {name} | {errors['exact'] / top:.1e} | {errors['fast'] / top:.1e} "
                  f"| {errors['exact'] / scale:.1e} | {errors['fast'] / scale:.1e} |")  # fmt: skip
    finally:
        mconv.set_algorithm(before)


if __name__ == "__main__":
    main()
