"""The built-in data sets: scikit-learn's digits (embedded) and CIFAR-10 from a local folder."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from nenni_deploy.errors import NenniError

from .dataset import Dataset

try:
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric

DATA_DIR_ENV = "NENNI_DATA_DIR"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_SIDE = 32
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR_BATCH_FOLDER = "cifar-10-batches-py"
_CIFAR_NOT_FOUND = (
    "CIFAR-10 not found: pass --data-dir DIR or set NENNI_DATA_DIR to a folder holding train.npz/test.npz "
    "or the official cifar-10-batches-py files"
)

# Everything a pickled numpy array may name, whichever numpy or pickle protocol wrote it; nothing else.
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}

_DIGITS_TEST_FRACTION = 0.25
_DIGITS_SEED = 0


def load_digits(split: str) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_index, test_index = train_test_split(
        np.arange(len(digits.target)),
        test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_SEED,
        stratify=digits.target,
    )
    index = train_index if split == "train" else test_index
    x = torch.from_numpy(digits.images[index] / 16.0).float().unsqueeze(1)
    y = torch.from_numpy(digits.target[index]).long()
    return Dataset(x, y, "digits", 10, tuple(str(d) for d in range(10)))


def load_cifar10(split: str, data_dir: str | os.PathLike[str] | None) -> Dataset:
    folder = _cifar_folder(data_dir)
    npz = folder / f"{split}.npz"
    if npz.is_file():
        images, labels = _read_npz(npz)
    else:
        images, labels = _read_batches(_batch_folder(folder, split), split)
    x = torch.from_numpy(images).float().div_(255)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x, y, "cifar10", len(CIFAR10_CLASSES), CIFAR10_CLASSES)


def _cifar_folder(data_dir: str | os.PathLike[str] | None) -> Path:
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise NenniError(_CIFAR_NOT_FOUND)
    folder = Path(chosen).expanduser()
    if not folder.is_dir():
        raise NenniError(f"{_CIFAR_NOT_FOUND} ({folder} is not a folder)")
    return folder


def _batch_folder(folder: Path, split: str) -> Path:
    first = _CIFAR_BATCHES[split][0]
    for candidate in (folder, folder / _CIFAR_BATCH_FOLDER):
        if (candidate / first).is_file():
            return candidate
    raise NenniError(f"{_CIFAR_NOT_FOUND} ({folder} has neither {split}.npz nor {first})")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 NCHW and labels from an npz with `x` (uint8 NHWC) and `y`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive["x"], archive["y"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise NenniError(f"cannot read {path} (expected arrays x and y): {exc}") from exc
    images = _checked_images(path, images, (_CIFAR_SIDE, _CIFAR_SIDE, 3))
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), _checked_labels(path, labels, len(images))


def _read_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_batch(folder / name) for name in _CIFAR_BATCHES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official python batch: a pickled dict with b'data' (N x 3072, CHW rows) and b'labels'."""
    if not path.is_file():
        raise NenniError(f"CIFAR-10 batch file missing: {path}")
    try:
        with path.open("rb") as file:
            batch = _RestrictedUnpickler(file).load()
    except NenniError:
        raise
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean the same to the user
        raise NenniError(f"cannot read CIFAR-10 batch {path} (corrupt?): {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict):
        raise NenniError(f"CIFAR-10 batch {path} is not a dict but {type(batch).__name__}")
    data, labels = _batch_entry(batch, "data"), _batch_entry(batch, "labels")
    if data is None or labels is None:
        raise NenniError(f"CIFAR-10 batch {path} lacks 'data' or 'labels'")
    images = _checked_images(path, np.asarray(data), (3 * _CIFAR_SIDE * _CIFAR_SIDE,))
    images = images.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)
    return images, _checked_labels(path, np.asarray(labels), len(images))


def _batch_entry(batch: dict[Any, Any], key: str) -> Any:
    # The official files come from Python 2 (bytes keys); a re-pickled copy may have str keys.
    return batch.get(key.encode(), batch.get(key))


def _checked_images(path: Path, images: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 1 + len(sample_shape) or images.shape[1:] != sample_shape:
        raise NenniError(
            f"{path}: images must be uint8 of shape (N, {', '.join(map(str, sample_shape))}), "
            f"found {images.dtype} {images.shape}"
        )
    return images


def _checked_labels(path: Path, labels: np.ndarray, count: int) -> np.ndarray:
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise NenniError(f"{path}: expected {count} integer labels, found {labels.dtype} {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise NenniError(f"{path}: labels outside 0..{len(CIFAR10_CLASSES) - 1}")
    return labels


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy's array rebuilders, so a pickle cannot name (and so cannot call) anything else."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="bytes")
        self._file = file

    def find_class(self, module: str, name: str) -> Any:
        allowed = _PICKLE_ALLOWED.get((module, name))
        if allowed is None:
            source = getattr(self._file, "name", "pickle")
            raise NenniError(
                f"refusing CIFAR-10 batch {source}: it names {module}.{name}, which a plain data file never needs"
            )
        return allowed
