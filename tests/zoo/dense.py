"""DenseNet-like: every layer's output is concatenated to its input; a 1x1 transition and average pooling."""

import torch
from torch import nn


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.act(self.norm(x)))], dim=1)


class DenseNetish(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(8, growth), DenseLayer(8 + growth, growth))
        c = 8 + 2 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 16, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(16, growth), DenseLayer(16 + growth, growth))
        self.norm = nn.BatchNorm2d(16 + 2 * growth)
        self.classifier = nn.Linear(16 + 2 * growth, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = torch.relu(self.norm(x)).mean((2, 3))
        return self.classifier(x)


def build(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return DenseNetish(num_classes, in_channels)
