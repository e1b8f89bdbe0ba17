"""A data set in memory: float images in [0, 1], NCHW, with integer labels and the class names."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import NenniError


@dataclass
class Dataset:
    x: torch.Tensor  # float32, N x C x H x W, in [0, 1]
    y: torch.Tensor  # int64, N
    name: str
    num_classes: int
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x.shape[1:])


def subset(ds: Dataset, n: int, seed: int | None = None) -> Dataset:
    """The first `n` samples, or with a seed `n` random ones (kept in data set order); all if `n >= len`."""
    if n < 0:
        raise NenniError(f"subset size must be at least 0, not {n}")
    if seed is None:
        index = torch.arange(min(n, len(ds)))
    else:
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(ds), generator=generator)[:n].sort().values
    return Dataset(ds.x[index], ds.y[index], ds.name, ds.num_classes, ds.classes)


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (x, y) batches in order; the last one may be smaller."""
    if batch_size < 1:
        raise NenniError(f"batch size must be at least 1, not {batch_size}")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
