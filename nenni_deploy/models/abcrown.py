"""The adversarially trained CIFAR-10 models distributed with alpha-beta-CROWN.

ResNet-2B / ResNet-4B have no batch norm and a bias on every convolution; CNN-A-Adv is a plain Sequential.
Module names equal the checkpoint keys, so the published files load without any key remapping.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from nenni_deploy.models.layers import CIFAR10_MEAN, CIFAR10_STD, Normalize
from nenni_deploy.models.registry import register_model

CNN_A_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CNN_A_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


class BiasBlock(nn.Module):
    """relu(conv2(relu(conv1(x))) + shortcut(x)); the shortcut is a strided 1x1 conv if the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1)
        # An empty Sequential keeps the key layout of the original (`shortcut.0.*` only when it exists).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNetB(nn.Module):
    """A stride-2 stem, one or two stages of two blocks (each stage halves the map), then a two-layer head."""

    def __init__(self, stem_planes: int, stage_planes: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.conv1 = nn.Conv2d(3, stem_planes, 3, stride=2, padding=1)
        self.stage_names = [f"layer{index}" for index in range(1, len(stage_planes) + 1)]
        in_planes = stem_planes
        for name, planes in zip(self.stage_names, stage_planes, strict=True):
            self.add_module(name, nn.Sequential(BiasBlock(in_planes, planes, 2), BiasBlock(planes, planes)))
            in_planes = planes
        side = 32 // 2 ** (len(stage_planes) + 1)
        self.linear1 = nn.Linear(in_planes * side * side, 100)
        self.linear2 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(self.normalize(x)))
        for name in self.stage_names:
            out = getattr(self, name)(out)
        out = F.relu(self.linear1(out.flatten(1)))
        return self.linear2(out)


def cnn_a(num_classes: int = 10) -> nn.Sequential:
    """CNN-A: the checkpoint's Sequential indices 0..7 after a `normalize` entry that holds no weights."""
    return nn.Sequential(
        OrderedDict(
            [
                ("normalize", Normalize(CNN_A_MEAN, CNN_A_STD)),
                ("0", nn.Conv2d(3, 16, 4, stride=2, padding=1)),
                ("1", nn.ReLU()),
                ("2", nn.Conv2d(16, 32, 4, stride=2, padding=1)),
                ("3", nn.ReLU()),
                ("4", nn.Flatten()),
                ("5", nn.Linear(32 * 8 * 8, 100)),
                ("6", nn.ReLU()),
                ("7", nn.Linear(100, num_classes)),
            ]
        )
    )


_ABCROWN = dict(family="abcrown", input_shape=(3, 32, 32), num_classes=10, dataset="cifar10")


@register_model("resnet2b", **_ABCROWN, checkpoints="alpha-beta-CROWN models/cifar10: resnet2b.pth")
def resnet2b(num_classes: int = 10) -> ResNetB:
    return ResNetB(8, (16,), num_classes)


@register_model("resnet4b", **_ABCROWN, checkpoints="alpha-beta-CROWN models/cifar10: resnet4b.pth")
def resnet4b(num_classes: int = 10) -> ResNetB:
    return ResNetB(16, (32, 32), num_classes)


@register_model("cnn_a_adv", **_ABCROWN, checkpoints="alpha-beta-CROWN models/cifar10: cnn_a_adv.model")
def cnn_a_adv(num_classes: int = 10) -> nn.Sequential:
    return cnn_a(num_classes)
