"""WideResNet-34-10 for CIFAR (Zagoruyko & Komodakis 2016) in the layout of the TRADES code.

Module names follow github.com/yaodongyu/TRADES (`models/wideresnet.py`), including its `sub_block1`: it is
built but never used in `forward`, and TRADES checkpoints carry its weights, so it is kept by default for them
to load strictly. Pass `sub_block1=False` to leave it out (it does not change the outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nenni_deploy.models.layers import CIFAR10_MEAN, CIFAR10_STD, Normalize
from nenni_deploy.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        # As in TRADES: the identity shortcut takes the raw input, the projection the pre-activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        out = F.relu(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        sub_block1: bool = True,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, not {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1, drop_rate)
        if sub_block1:
            self.sub_block1 = NetworkBlock(blocks, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def _init_weights(module: nn.Module) -> None:
    # TRADES' initialisation (He normal, fan-out), so training from scratch matches the published runs.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)


@register_model(
    "wide_resnet34_10",
    family="wide_resnet",
    input_shape=(3, 32, 32),
    num_classes=10,
    dataset="cifar10",
    checkpoints="yaodongyu/TRADES: model_cifar_wrn.pt",
)
def wide_resnet34_10(num_classes: int = 10, sub_block1: bool = True) -> WideResNet:
    return WideResNet(34, 10, num_classes, sub_block1=sub_block1)
