"""Data loading: the embedded digits split, CIFAR-10 from npz or official batches, and a safe unpickler."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nenni_deploy.data import CIFAR10_CLASSES, Dataset, iterate_batches, load_dataset, subset
from nenni_deploy.errors import NenniError

# sha256 of the canonical CIFAR-10 test arrays, from ../shared/data/cifar10/README.md.
CIFAR10_TEST_X_SHA256 = "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04"
CIFAR10_TEST_Y_SHA256 = "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5"


class _Python2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as in the official batches, which were pickled by Python 2."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_str8(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str8


def _write_pickle(path: Path, obj: Any, style: str) -> None:
    with path.open("wb") as file:
        if style == "python2":
            _Python2StylePickler(file, protocol=2).dump(obj)
        else:
            pickle.dump(obj, file, protocol=int(style))


def _synthetic_batch(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, count)]


def _write_batch_folder(folder: Path, style: str, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, labels = _synthetic_batch(per_batch, index)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * per_batch,
        }
        _write_pickle(folder / name, batch, style)
        written[name] = (data, labels)
    return written


def _write_npz(folder: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{split}.npz", x=x, y=y)


# --- digits -------------------------------------------------------------------------------------------------


def test_digits_split_is_deterministic_stratified_and_disjoint() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    again = load_dataset("digits", "train")
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    train_rows = {row.numpy().tobytes() for row in train.x}
    assert not train_rows & {row.numpy().tobytes() for row in test.x}
    assert len(train_rows) == len(train), "every digits image is distinct, so disjoint rows mean disjoint samples"
    per_class = torch.bincount(torch.cat([train.y, test.y]), minlength=10)
    share = torch.bincount(test.y, minlength=10) - per_class * 0.25
    assert share.abs().max() <= 1, "stratified: each class is split 75/25"


def test_digits_format() -> None:
    ds = load_dataset("digits", "test")
    assert ds.x.dtype == torch.float32 and ds.x.shape == (450, 1, 8, 8)
    assert ds.y.dtype == torch.int64
    assert 0 <= ds.x.min() and ds.x.max() <= 1
    assert (ds.name, ds.num_classes, ds.classes) == ("digits", 10, tuple("0123456789"))


def test_unknown_data_set_and_split() -> None:
    with pytest.raises(NenniError, match="unknown data set 'mnist'.*digits, cifar10"):
        load_dataset("mnist", "train")
    with pytest.raises(NenniError, match="unknown split 'val'"):
        load_dataset("digits", "val")


# --- CIFAR-10: where it is ----------------------------------------------------------------------------------


def test_cifar10_without_a_folder_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NENNI_DATA_DIR", raising=False)
    with pytest.raises(NenniError, match="pass --data-dir DIR or set NENNI_DATA_DIR"):
        load_dataset("cifar10", "test")


def test_cifar10_folder_without_data(tmp_path: Path) -> None:
    with pytest.raises(NenniError, match="CIFAR-10 not found"):
        load_dataset("cifar10", "test", tmp_path)
    with pytest.raises(NenniError, match="is not a folder"):
        load_dataset("cifar10", "test", tmp_path / "nowhere")


def test_cifar10_npz_via_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    _write_npz(tmp_path, "test", x, np.array([0, 9, 3, 3], dtype=np.uint8))
    monkeypatch.setenv("NENNI_DATA_DIR", str(tmp_path))
    ds = load_dataset("cifar10", "test")
    assert ds.x.shape == (4, 3, 32, 32) and ds.x.dtype == torch.float32 and ds.x.is_contiguous()
    torch.testing.assert_close(ds.x, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert ds.y.tolist() == [0, 9, 3, 3] and ds.y.dtype == torch.int64
    assert ds.classes == CIFAR10_CLASSES and ds.num_classes == 10


def test_explicit_folder_wins_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_npz(tmp_path / "a", "test", np.zeros((1, 32, 32, 3), np.uint8), np.array([1]))
    _write_npz(tmp_path / "b", "test", np.zeros((2, 32, 32, 3), np.uint8), np.array([2, 2]))
    monkeypatch.setenv("NENNI_DATA_DIR", str(tmp_path / "a"))
    assert len(load_dataset("cifar10", "test", tmp_path / "b")) == 2


@pytest.mark.parametrize(
    ("x", "y", "problem"),
    [
        (np.zeros((2, 32, 32, 3), np.float32), np.array([0, 1]), "must be uint8"),
        (np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 1]), "must be uint8 of shape"),
        (np.zeros((2, 32, 32, 3), np.uint8), np.array([0]), "expected 2 integer labels"),
        (np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 10]), "labels outside"),
    ],
)
def test_cifar10_npz_is_validated(tmp_path: Path, x: np.ndarray, y: np.ndarray, problem: str) -> None:
    _write_npz(tmp_path, "test", x, y)
    with pytest.raises(NenniError, match=problem):
        load_dataset("cifar10", "test", tmp_path)


def test_corrupt_npz(tmp_path: Path) -> None:
    (tmp_path / "test.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(NenniError, match="cannot read"):
        load_dataset("cifar10", "test", tmp_path)


# --- CIFAR-10: the official python batches ------------------------------------------------------------------


@pytest.mark.parametrize("style", ["python2", "4", "5"])
@pytest.mark.parametrize("nested", [True, False], ids=["subfolder", "flat"])
def test_official_batches(tmp_path: Path, style: str, nested: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    written = _write_batch_folder(folder, style)
    train, test = load_dataset("cifar10", "train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    data, labels = written["test_batch"]
    torch.testing.assert_close(test.x, torch.from_numpy(data).float().view(3, 3, 32, 32) / 255)
    assert test.y.tolist() == labels
    assert train.y.tolist() == [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]


def test_missing_training_batch(tmp_path: Path) -> None:
    _write_batch_folder(tmp_path, "4")
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(NenniError, match="batch file missing.*data_batch_3"):
        load_dataset("cifar10", "train", tmp_path)


def test_truncated_batch(tmp_path: Path) -> None:
    _write_batch_folder(tmp_path, "4")
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(NenniError, match="cannot read CIFAR-10 batch"):
        load_dataset("cifar10", "test", tmp_path)


def test_batch_with_wrong_contents(tmp_path: Path) -> None:
    _write_batch_folder(tmp_path, "4")
    _write_pickle(tmp_path / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "4")
    with pytest.raises(NenniError, match="must be uint8 of shape"):
        load_dataset("cifar10", "test", tmp_path)


class _RunsACommand:
    """Unpickles by calling os.system; the loader must refuse it before anything is called."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_batch_is_refused_unrun(tmp_path: Path) -> None:
    _write_batch_folder(tmp_path, "4")
    marker = tmp_path / "it-ran"
    _write_pickle(tmp_path / "test_batch", {b"data": _RunsACommand(marker), b"labels": []}, "4")
    with pytest.raises(NenniError, match=r"refusing CIFAR-10 batch .*test_batch: it names (posix|os)\.system"):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()


# --- CIFAR-10: the real files in ../shared ------------------------------------------------------------------


@pytest.mark.shared
def test_shared_cifar10_test_split_is_canonical(cifar10_dir: Path) -> None:
    ds = load_dataset("cifar10", "test", cifar10_dir)
    assert ds.x.shape == (10_000, 3, 32, 32) and ds.x.dtype == torch.float32
    pixels = (ds.x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == CIFAR10_TEST_X_SHA256
    assert hashlib.sha256(ds.y.numpy().astype(np.uint8).tobytes()).hexdigest() == CIFAR10_TEST_Y_SHA256


@pytest.mark.shared
@pytest.mark.slow
def test_shared_cifar10_train_split(cifar10_dir: Path) -> None:
    ds = load_dataset("cifar10", "train", cifar10_dir)
    assert ds.x.shape == (50_000, 3, 32, 32)
    assert torch.bincount(ds.y).tolist() == [5000] * 10


# --- subsets and batches ------------------------------------------------------------------------------------


def _tiny(n: int = 10) -> Dataset:
    return Dataset(torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n), "tiny", 10, tuple("0123456789"))


def test_subset_first_n_and_seeded() -> None:
    ds = _tiny()
    assert subset(ds, 3).y.tolist() == [0, 1, 2]
    assert len(subset(ds, 99)) == 10
    picked = subset(ds, 4, seed=1)
    assert picked.y.tolist() == subset(ds, 4, seed=1).y.tolist() == sorted(picked.y.tolist())
    assert len(set(picked.y.tolist())) == 4
    assert any(subset(ds, 4, seed=s).y.tolist() != picked.y.tolist() for s in range(2, 6))
    assert torch.equal(picked.x.view(-1), picked.y.float()), "images stay with their labels"
    with pytest.raises(NenniError):
        subset(ds, -1)


def test_iterate_batches_covers_everything_in_order() -> None:
    ds = _tiny(7)
    batches = list(iterate_batches(ds.x, ds.y, 3))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(7))
    with pytest.raises(NenniError):
        next(iterate_batches(ds.x, ds.y, 0))
