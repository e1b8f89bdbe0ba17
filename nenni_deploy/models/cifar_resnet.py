"""The CIFAR ResNet of He et al. (2016) with the parameter-free "option A" shortcut.

Module names match the akamaster checkpoints (github.com/akamaster/pytorch_resnet_cifar10). Additions and
ReLUs are plain functions so that torch.fx shows each block as conv2 -> bn2 -> add -> relu, which is how the
NENNI converter finds batch-norm pairs and the convolutions that feed a residual addition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nenni_deploy.models.layers import Normalize
from nenni_deploy.models.registry import register_model

# The akamaster models were trained with ImageNet statistics, so these are part of the weights' contract.
AKAMASTER_MEAN = (0.485, 0.456, 0.406)
AKAMASTER_STD = (0.229, 0.224, 0.225)


class DownsampleA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels, so it adds no parameters."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        downsamples = stride != 1 or in_planes != planes
        self.shortcut = DownsampleA(planes) if downsamples else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """6n+2 layers: a stem conv, three stages of n blocks (16, 32, 64 channels), global pool, linear."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(AKAMASTER_MEAN, AKAMASTER_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = _stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = _stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _kaiming_init(module: nn.Module) -> None:
    # The reference implementation's initialisation, so that training from scratch behaves like the paper.
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.kaiming_normal_(module.weight)


_CIFAR_RESNET = dict(family="cifar_resnet", input_shape=(3, 32, 32), num_classes=10, dataset="cifar10")
_AKAMASTER = "akamaster/pytorch_resnet_cifar10: {} (a dict with state_dict, DataParallel prefix)"


@register_model("resnet20", **_CIFAR_RESNET, checkpoints=_AKAMASTER.format("resnet20-12fca82f.th"))
def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(3, num_classes)


@register_model("resnet32", **_CIFAR_RESNET, checkpoints=_AKAMASTER.format("resnet32-d509ac18.th"))
def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(5, num_classes)


@register_model("resnet44", **_CIFAR_RESNET, checkpoints=_AKAMASTER.format("resnet44-014dd654.th"))
def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(7, num_classes)


@register_model("resnet56", **_CIFAR_RESNET, checkpoints=_AKAMASTER.format("resnet56-4bfd9763.th"))
def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(9, num_classes)


@register_model("resnet110", **_CIFAR_RESNET, checkpoints=_AKAMASTER.format("resnet110-1d1ed7c2.th"))
def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(18, num_classes)
