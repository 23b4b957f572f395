"""Layers and the Module system (PyTorch's API on NumPy arrays)."""

from .conv import (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
                   is_conv)  # fmt: skip
from .init import manual_seed
from .layers import (AvgPool, AvgPool1d, AvgPool2d, AvgPool3d, Flatten, GlobalAvgPool, Linear,
                     MaxPool, MaxPool1d, MaxPool2d, MaxPool3d, ReLU, Sequential)  # fmt: skip
from .module import IncompatibleKeys, Module, Parameter
from .tripy import Conv, ConvTranspose

__all__ = [
    "Module", "Parameter", "IncompatibleKeys", "manual_seed", "is_conv",
    "Conv", "Conv1d", "Conv2d", "Conv3d",
    "ConvTranspose", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Sequential", "ReLU", "Flatten", "Linear", "GlobalAvgPool",
    "AvgPool", "AvgPool1d", "AvgPool2d", "AvgPool3d", "MaxPool", "MaxPool1d", "MaxPool2d", "MaxPool3d",
]  # fmt: skip
