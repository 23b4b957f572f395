"""MobileNetV2 (torchvision's architecture and state_dict keys, key for key).

    features: ConvBNReLU6 (3x3/2) - 17 inverted residual blocks - ConvBNReLU6 (1x1 to 1280)
    then global average pool - classifier (Dropout, Linear)

An inverted residual block is ``conv`` = [1x1 expand - BN - ReLU6] - 3x3 depthwise - BN -
ReLU6 - 1x1 project - BN, plus x when the stride is 1 and the channels match: the keys are
torchvision's (``features.1.conv.0.0.weight``, ``features.2.conv.3.running_var``).

>>> import numpy as np
>>> from mconv import models
>>> net = models.mobilenet_v2(num_classes=3, dtype="float64").eval()
>>> net(np.zeros((1, 3, 32, 32))).shape
(1, 3)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .. import _args
from ..nn import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, Module,
                  ReLU6, Sequential, init)  # fmt: skip
from ..nn.module import to_device

#: (expansion t, channels c, blocks n, first stride s), torchvision's table
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: the nearest multiple of ``divisor``, not below 90%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class _Layers:
    def __init__(self, dtype, device):
        self.dtype, self.device = dtype, device

    def conv(self, cin, cout, k, stride=1, groups=1):
        conv = Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, groups=groups,
                      bias=False, dtype=self.dtype, device=self.device)  # fmt: skip
        conv.weight.data = to_device(
            init.kaiming_normal_fan_out(conv.weight.shape, conv.dtype), conv.device
        )
        return conv

    def bn(self, channels):
        return BatchNorm2d(channels, dtype=self.dtype, device=self.device)

    def conv_bn_relu6(self, cin, cout, k=3, stride=1, groups=1):
        """torchvision's Conv2dNormActivation: keys .0 (conv) and .1 (BN)."""
        return Sequential(self.conv(cin, cout, k, stride, groups), self.bn(cout), ReLU6())


class InvertedResidual(Module):
    """``conv(x) + x`` when stride is 1 and inp == oup, else ``conv(x)``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, layers: _Layers):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        parts = [layers.conv_bn_relu6(inp, hidden, 1)] if expand_ratio != 1 else []
        parts += [layers.conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                  layers.conv(hidden, oup, 1), layers.bn(oup)]  # fmt: skip
        self.conv = Sequential(*parts)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.use_res_connect else y

    def backward(self, grad_output):
        dx = self.conv.backward(grad_output)
        return dx + grad_output if self.use_res_connect else dx


class MobileNetV2(Sequential):
    """features - avgpool - flatten - classifier, with torchvision's keys."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 dtype: Any = "float32", device: str = "cpu"):  # fmt: skip
        num_classes = _args.check_int(num_classes, "num_classes", minimum=1)
        layers = _Layers(dtype, device)
        channels = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        features = [layers.conv_bn_relu6(3, channels, 3, 2)]
        for t, c, n, s in SETTINGS:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t, layers))
                channels = out
        features.append(layers.conv_bn_relu6(channels, last, 1))
        fc = Linear(last, num_classes, dtype=dtype, device=device)
        fc.weight.data = to_device(init.normal(fc.weight.shape, 0.01, fc.dtype), fc.device)
        fc.bias.data = fc.bias.data * 0
        super().__init__(OrderedDict(
            features=Sequential(*features), avgpool=AdaptiveAvgPool2d(1), flatten=Flatten(),
            classifier=Sequential(Dropout(dropout), fc),
        ))  # fmt: skip


def mobilenet_v2(num_classes: int = 1000, dtype: Any = "float32",
                 device: str = "cpu") -> MobileNetV2:  # fmt: skip
    return MobileNetV2(num_classes, dtype=dtype, device=device)
