"""Layers and the Module system (PyTorch's API on NumPy and CuPy arrays)."""

from .activation import (GELU, Hardsigmoid, Hardswish, Identity, LeakyReLU, PReLU, ReLU, ReLU6,
                         Sigmoid, SiLU, Softmax, Tanh)  # fmt: skip
from .container import Concat, Residual, Sequential
from .conv import (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
                   is_conv)  # fmt: skip
from .dropout import Dropout, Dropout2d
from .init import manual_seed
from .layers import Flatten, Linear
from .module import IncompatibleKeys, Module, Parameter
from .norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .pooling import (AdaptiveAvgPool, AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d,
                      AvgPool, AvgPool1d, AvgPool2d, AvgPool3d, GlobalAvgPool, MaxPool, MaxPool1d,
                      MaxPool2d, MaxPool3d)  # fmt: skip
from .tripy import Conv, ConvTranspose

__all__ = [
    "Module", "Parameter", "IncompatibleKeys", "manual_seed", "is_conv",
    "Conv", "Conv1d", "Conv2d", "Conv3d",
    "ConvTranspose", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Sequential", "Residual", "Concat", "Flatten", "Linear",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Dropout", "Dropout2d",
    "Identity", "ReLU", "ReLU6", "LeakyReLU", "PReLU", "SiLU", "GELU", "Sigmoid", "Tanh",
    "Hardswish", "Hardsigmoid", "Softmax",
    "GlobalAvgPool", "AvgPool", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "MaxPool", "MaxPool1d", "MaxPool2d", "MaxPool3d",
    "AdaptiveAvgPool", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
]  # fmt: skip
