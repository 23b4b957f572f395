"""Conv nets with torchvision's architectures and state_dict keys: a torchvision (or torch)
checkpoint loads with ``layouts.load_into(model, path, strict=True)`` and computes what
torch computes. Weights are initialised as torchvision does (kaiming-normal fan-out convs,
BatchNorm ones/zeros); nothing is downloaded.
"""

from .mobilenet import InvertedResidual, MobileNetV2, mobilenet_v2
from .resnet import BasicBlock, Block, Bottleneck, ResNet, resnet18, resnet50, resnext50_32x4d

__all__ = ["ResNet", "Block", "BasicBlock", "Bottleneck", "resnet18", "resnet50",
           "resnext50_32x4d", "MobileNetV2", "InvertedResidual", "mobilenet_v2"]  # fmt: skip
