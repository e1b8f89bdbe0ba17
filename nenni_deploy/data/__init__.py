"""Data sets as float images in [0, 1], NCHW: the embedded digits set, CIFAR-10 from a local folder, or a user's
own folder (npz arrays or image folders)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NenniError
from .builtin import CIFAR10_CLASSES, DATA_DIR_ENV, load_cifar10, load_digits
from .dataset import Dataset, iterate_batches, subset
from .folders import SPLITS, load_folder, parse_image_size

BUILTIN = ("digits", "cifar10")
DATASETS = BUILTIN  # the names; any folder works too


@dataclass(frozen=True)
class DataSpec:
    """Which data set, as the user named it: recorded in model directories so later commands default to it."""

    name: str  # digits, cifar10, or a folder
    dir: str | None = None  # CIFAR-10's folder
    image_size: tuple[int, int] | None = None  # image folders: resize to H x W

    def load(self, split: str) -> Dataset:
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
        size = parse_image_size(image_size) if isinstance(image_size, str) else image_size
        if name not in BUILTIN:
            name = str(Path(name).expanduser().resolve())
        return cls(name, str(data_dir) if data_dir is not None else None, tuple(size) if size else None)


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: tuple[int, int] | None = None,
) -> Dataset:
    """Load `split` ('train' or 'test') of 'digits' (embedded), 'cifar10' (from `data_dir` or $NENNI_DATA_DIR)
    or a folder with train.npz/test.npz or train/<class>/ and test/<class>/ images."""
    if split not in SPLITS:
        raise NenniError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    name = str(name)
    if name == "digits":
        return load_digits(split)
    if name == "cifar10":
        return load_cifar10(split, data_dir)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return load_folder(folder, split, image_size)
    if folder.exists():
        raise NenniError(f"--data {name} is a file: give a folder holding train.npz/test.npz or train/ and test/")
    raise NenniError(
        f"unknown data set {name!r}; known data sets: {', '.join(BUILTIN)}, or a folder with train.npz/test.npz "
        "or train/<class>/ and test/<class>/ images"
    )


__all__ = [
    "BUILTIN",
    "CIFAR10_CLASSES",
    "DATASETS",
    "DATA_DIR_ENV",
    "DataSpec",
    "Dataset",
    "SPLITS",
    "iterate_batches",
    "load_dataset",
    "parse_image_size",
    "subset",
]
