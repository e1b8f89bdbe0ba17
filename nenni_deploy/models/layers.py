"""Layers shared by the model families."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Per-channel statistics of the CIFAR-10 training set, as most robust-training code bases use them.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel `(x - mean) / std`, the first op of every model.

    Keeping it inside the model lets attacks and the exported graph work on [0, 1] pixels. The buffers are
    not persistent: they are part of the architecture, and third-party checkpoints do not carry them.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.register_buffer("mean", _per_channel(mean), persistent=False)
        self.register_buffer("std", _per_channel(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


def _per_channel(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
