"""Data sets as float images in [0, 1], NCHW: the embedded digits set, CIFAR-10 from a local folder, or a user's
own folder (npz arrays or image folders)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NenniError
from .builtin import CIFAR10_CLASSES, DATA_DIR_ENV, load_cifar10, load_digits
from .dataset import BUILTIN, Dataset, DataSpec, iterate_batches, subset
from .folders import SPLITS, load_folder, parse_image_size


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
        ds = load_digits(split)
        ds.spec = DataSpec("digits")
        return ds
    if name == "cifar10":
        ds = load_cifar10(split, data_dir)
        ds.spec = DataSpec("cifar10", str(data_dir) if data_dir is not None else None)
        return ds
    folder = Path(name).expanduser()
    if folder.is_dir():
        ds = load_folder(folder, split, image_size)
        ds.spec = DataSpec.create(str(folder), None, image_size)
        return ds
    if folder.exists():
        raise NenniError(f"--data {name} is a file: give a folder holding train.npz/test.npz or train/ and test/")
    raise NenniError(
        f"unknown data set {name!r}; known data sets: {', '.join(BUILTIN)}, or a folder with train.npz/test.npz "
        "or train/<class>/ and test/<class>/ images"
    )


__all__ = [
    "BUILTIN",
    "CIFAR10_CLASSES",
    "DATA_DIR_ENV",
    "DataSpec",
    "Dataset",
    "SPLITS",
    "iterate_batches",
    "load_dataset",
    "parse_image_size",
    "subset",
]
