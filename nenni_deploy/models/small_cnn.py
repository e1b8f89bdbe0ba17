"""A tiny CNN for the embedded default data set (scikit-learn digits, 1x8x8): the pipeline runs anywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nenni_deploy.models.layers import Normalize
from nenni_deploy.models.registry import register_model

# Pixel mean and std of the digits training split (nenni_deploy.data), computed once.
DIGITS_MEAN = (0.3052,)
DIGITS_STD = (0.3760,)


class SmallCNN(nn.Module):
    """Two 3x3 conv layers at 8x8, a 2x2 max pool, one more conv at 4x4, global average pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.normalize = Normalize(DIGITS_MEAN * in_channels, DIGITS_STD * in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.max_pool2d(out, 2)
        out = F.relu(self.bn3(self.conv3(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model(
    "small_cnn",
    family="small_cnn",
    input_shape=(1, 8, 8),
    num_classes=10,
    dataset="digits",
    checkpoints="none published: `nenni train --arch small_cnn` writes RUN_DIR/weights.safetensors",
)
def small_cnn(num_classes: int = 10) -> SmallCNN:
    return SmallCNN(num_classes)
