"""PreAct ResNet-18 for CIFAR (He et al. 2016b), in the layout of Madry-style and Rice et al. (2020) code.

Module names follow github.com/locuslab/robust_overfitting, so its checkpoints load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nenni_deploy.models.layers import CIFAR10_MEAN, CIFAR10_STD, Normalize
from nenni_deploy.models.registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # A projection shortcut sees the pre-activated input; the identity sees the raw one.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        in_planes = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
            stride = 1 if index == 1 else 2
            layers = [PreActBlock(in_planes, planes, stride)] + [PreActBlock(planes, planes) for _ in range(count - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            in_planes = planes
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model(
    "preact_resnet18",
    family="preact_resnet",
    input_shape=(3, 32, 32),
    num_classes=10,
    dataset="cifar10",
    checkpoints="locuslab/robust_overfitting: model_best.pth or any model_<epoch>.pth",
)
def preact_resnet18(num_classes: int = 10) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes)
