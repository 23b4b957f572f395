"""PyTorch's default initialisation, drawn from one seedable generator.

Conv and Linear weights: kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
``fan_in = weight.shape[1] * prod(kernel_size)`` (for a transposed conv that
is out_channels/groups * prod(k), as in PyTorch).
"""

from __future__ import annotations

import math

import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Seed the generator used by every layer's initialisation."""
    global _generator
    _generator = np.random.default_rng(seed)


def fan_in(shape: tuple[int, ...]) -> int:
    return int(shape[1] * math.prod(shape[2:])) if len(shape) > 1 else int(shape[0])


def uniform(shape: tuple[int, ...], bound: float, dtype) -> np.ndarray:
    """U(-bound, bound), drawn in float64 and cast once."""
    return _generator.uniform(-bound, bound, size=shape).astype(dtype)


def kaiming_uniform(shape: tuple[int, ...], dtype, a: float = math.sqrt(5.0)) -> np.ndarray:
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return uniform(shape, gain * math.sqrt(3.0 / fan_in(shape)), dtype)


def default_bias(weight_shape: tuple[int, ...], channels: int, dtype) -> np.ndarray:
    fan = fan_in(weight_shape)
    return uniform((channels,), 1.0 / math.sqrt(fan) if fan > 0 else 0.0, dtype)


def keep_mask(shape: tuple[int, ...], p: float) -> np.ndarray:
    """A dropout mask: True with probability 1 - p, from the same seedable generator."""
    return _generator.random(size=shape) >= p


def kaiming_normal_fan_out(shape: tuple[int, ...], dtype) -> np.ndarray:
    """N(0, 2 / fan_out), fan_out = shape[0] * prod(kernel): torchvision's conv init."""
    fan_out = int(shape[0] * math.prod(shape[2:]))
    return (_generator.standard_normal(size=shape) * math.sqrt(2.0 / fan_out)).astype(dtype)


def normal(shape: tuple[int, ...], std: float, dtype) -> np.ndarray:
    """N(0, std^2), drawn in float64 and cast once."""
    return (_generator.standard_normal(size=shape) * std).astype(dtype)
