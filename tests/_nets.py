"""Tiny networks for fast unit tests of the method (residual block with batch norm, conv and linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class TinyNet(nn.Module):
    """conv1 -> residual block -> strided conv -> pool -> fc1 -> linear: every kind of layer NENNI touches."""

    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.block = TinyBlock(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(2 * c)
        self.fc1 = nn.Linear(2 * c, 32)
        self.linear = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.block(x)
        x = F.relu(self.bn_down(self.down(x)))
        x = x.mean((2, 3))
        return self.linear(F.relu(self.fc1(x)))


def tiny_net(seed: int = 0) -> TinyNet:
    """A TinyNet with non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = TinyNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()
