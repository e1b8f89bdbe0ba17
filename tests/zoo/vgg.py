"""VGG-like: conv-BN-ReLU pairs, max pooling, an MLP head with dropout. Trained on normalised inputs."""

from torch import nn


def build(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, width),
        *block(width, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        *block(2 * width, 2 * width),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 2 * 2, 32),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(32, num_classes),
    )
