"""A data set in memory: float images in [0, 1], NCHW, with integer labels and the class names."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import NenniError

BUILTIN = ("digits", "cifar10")


@dataclass(frozen=True)
class DataSpec:
    """Which data set, as the user named it: recorded in model directories so later commands default to it."""

    name: str  # digits, cifar10, or a folder
    dir: str | None = None  # CIFAR-10's folder
    image_size: tuple[int, int] | None = None  # image folders: resize to H x W

    def load(self, split: str) -> Dataset:
        from . import load_dataset

        return load_dataset(self.name, split, self.dir, image_size=self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dir": self.dir, "image_size": list(self.image_size) if self.image_size else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DataSpec | None:
        if not d or not d.get("name"):
            return None
        size = d.get("image_size")
        return cls(str(d["name"]), d.get("dir"), tuple(size) if size else None)

    @classmethod
    def create(cls, name: str, data_dir: str | os.PathLike | None = None, image_size=None) -> DataSpec:
        """From command-line values: a folder is recorded by its absolute path; `image_size` may be text."""
        from .folders import parse_image_size

        size = parse_image_size(image_size) if isinstance(image_size, str) else image_size
        if name not in BUILTIN:
            name = str(Path(name).expanduser().resolve())
        return cls(name, str(data_dir) if data_dir is not None else None, tuple(size) if size else None)


@dataclass
class Dataset:
    x: torch.Tensor  # float32, N x C x H x W, in [0, 1]
    y: torch.Tensor  # int64, N
    name: str
    num_classes: int
    classes: tuple[str, ...]
    spec: DataSpec | None = None  # how to load it again (set by load_dataset; recorded in model directories)

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
    return Dataset(ds.x[index], ds.y[index], ds.name, ds.num_classes, ds.classes, ds.spec)


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (x, y) batches in order; the last one may be smaller."""
    if batch_size < 1:
        raise NenniError(f"batch size must be at least 1, not {batch_size}")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
