"""ResNet, ResNeXt (torchvision's architectures and state_dict keys, key for key).

    conv1 (7x7/2) - bn1 - relu - maxpool (3x3/2) - layer1..layer4 - avgpool - fc

Each layer is a Sequential of residual blocks: ``basic`` (two 3x3 convs) or ``bottleneck``
(1x1, grouped 3x3, 1x1, four times as many output channels), with ``downsample`` (1x1 conv
and BatchNorm) as the shortcut where the shape changes; ``relu(body(x) + shortcut(x))``.
So ``layer1.0.downsample.1.running_var`` means what it means in torchvision, and a torch
checkpoint loads with ``layouts.load_into(model, path, strict=True)``.

>>> import numpy as np
>>> from mconv import models
>>> net = models.ResNet("basic", [1, 1, 1, 1], num_classes=5, dtype="float64").eval()
>>> net(np.zeros((1, 3, 32, 32))).shape
(1, 5)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .. import _args
from ..nn import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Module,
                  ReLU, Sequential, init)  # fmt: skip
from ..nn.module import to_device


class Block(Module):
    """A residual block with torchvision's member names: ``relu(body(x) + shortcut(x))``,
    the body the members named in ``body`` (in order), the shortcut ``downsample`` (or x)."""

    body: tuple[str, ...] = ()
    expansion = 1

    def forward(self, x):
        y = x
        for name in self.body:
            y = getattr(self, name)(y)
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(y + skip)

    def backward(self, grad_output):
        dy = self.relu.backward(grad_output)
        d = dy
        for name in reversed(self.body):
            d = getattr(self, name).backward(d)
        return d + (dy if self.downsample is None else self.downsample.backward(dy))

    def _set_downsample(self, downsample) -> None:
        if downsample is not None:
            self.downsample = downsample
        else:  # a plain attribute: no keys, as torchvision's None
            object.__setattr__(self, "downsample", None)


class BasicBlock(Block):
    body = ("conv1", "bn1", "relu1", "conv2", "bn2")

    def __init__(self, inplanes, planes, stride, downsample, groups, base_width, conv):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock only supports groups=1 and width_per_group=64, but got "
                f"groups={groups}, width_per_group={base_width}"
            )
        self.conv1, self.bn1 = conv(inplanes, planes, 3, stride), conv.bn(planes)
        self.relu1 = ReLU()
        self.conv2, self.bn2 = conv(planes, planes, 3, 1), conv.bn(planes)
        self.relu = ReLU()
        self._set_downsample(downsample)


class Bottleneck(Block):
    body = ("conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3")
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, groups, base_width, conv):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1, self.bn1 = conv(inplanes, width, 1, 1), conv.bn(width)
        self.relu1 = ReLU()
        self.conv2, self.bn2 = conv(width, width, 3, stride, groups), conv.bn(width)
        self.relu2 = ReLU()
        self.conv3, self.bn3 = conv(width, planes * 4, 1, 1), conv.bn(planes * 4)
        self.relu = ReLU()
        self._set_downsample(downsample)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class _Convs:
    """Makes the bias-free convs (torchvision's kaiming-normal, fan_out) and BatchNorms."""

    def __init__(self, dtype, device):
        self.dtype, self.device = dtype, device

    def __call__(self, cin, cout, k, stride, groups=1):
        conv = Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False,
                      dtype=self.dtype, device=self.device)  # fmt: skip
        conv.weight.data = to_device(
            init.kaiming_normal_fan_out(conv.weight.shape, conv.dtype), conv.device
        )
        return conv

    def bn(self, channels):
        return BatchNorm2d(channels, dtype=self.dtype, device=self.device)


class ResNet(Sequential):
    """torchvision's ResNet/ResNeXt: ``block`` 'basic' or 'bottleneck', ``layers`` blocks per
    stage, ``groups`` and ``width_per_group`` for ResNeXt. A Sequential with named children
    (conv1 ... fc), so ``forward``/``backward`` run them in order."""

    def __init__(self, block: str, layers, num_classes: int = 1000, groups: int = 1,
                 width_per_group: int = 64, dtype: Any = "float32", device: str = "cpu"):  # fmt: skip
        kind = _args.choice(block, tuple(BLOCKS), "block")
        if not isinstance(layers, (list, tuple)) or len(layers) != 4:
            raise ValueError(f"layers must be 4 block counts, but got layers={layers!r}")
        counts = [_args.check_int(n, "layers", minimum=1) for n in layers]
        num_classes = _args.check_int(num_classes, "num_classes", minimum=1)
        groups = _args.check_int(groups, "groups", minimum=1)
        width = _args.check_int(width_per_group, "width_per_group", minimum=1)
        conv = _Convs(dtype, device)
        cls = BLOCKS[kind]
        stages, inplanes = OrderedDict(), 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
            stride = 1 if index == 0 else 2
            blocks = []
            for b in range(count):
                downsample = None
                if b == 0 and (stride != 1 or inplanes != planes * cls.expansion):
                    downsample = Sequential(conv(inplanes, planes * cls.expansion, 1, stride),
                                            conv.bn(planes * cls.expansion))  # fmt: skip
                blocks.append(cls(inplanes, planes, stride if b == 0 else 1, downsample, groups,
                                  width, conv))  # fmt: skip
                inplanes = planes * cls.expansion
            stages[f"layer{index + 1}"] = Sequential(*blocks)
        super().__init__(OrderedDict(
            conv1=conv(3, 64, 7, 2), bn1=conv.bn(64), relu=ReLU(),
            maxpool=MaxPool2d(3, stride=2, padding=1), **stages,
            avgpool=AdaptiveAvgPool2d(1), flatten=Flatten(),
            fc=Linear(512 * cls.expansion, num_classes, dtype=dtype, device=device),
        ))  # fmt: skip


def resnet18(num_classes: int = 1000, dtype: Any = "float32", device: str = "cpu") -> ResNet:
    return ResNet("basic", [2, 2, 2, 2], num_classes, dtype=dtype, device=device)


def resnet50(num_classes: int = 1000, dtype: Any = "float32", device: str = "cpu") -> ResNet:
    return ResNet("bottleneck", [3, 4, 6, 3], num_classes, dtype=dtype, device=device)


def resnext50_32x4d(num_classes: int = 1000, dtype: Any = "float32",
                    device: str = "cpu") -> ResNet:  # fmt: skip
    return ResNet("bottleneck", [3, 4, 6, 3], num_classes, groups=32, width_per_group=4,
                  dtype=dtype, device=device)  # fmt: skip
