"""Bad input from a user's own model and data: each is one line naming the problem, a non-zero exit, and no
output written (issue 14's catalogue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import assert_one_line_error, invoke

from nenni_deploy.data import load_dataset
from nenni_deploy.errors import NenniError

GOOD_MODEL = """
from torch import nn

def build(num_classes=10, width=8):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )

def broken():
    raise RuntimeError("the user's code failed")

def not_a_model():
    return 42

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.inner(x).flatten(1))

class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return y
        return -y

def branchy():
    return Branchy()
"""


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user")
    (folder / "model.py").write_text(GOOD_MODEL)
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_model_for_tests", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build().state_dict(), folder / "weights.pt")
    torch.save(module.build(width=4).state_dict(), folder / "narrow.pt")
    (folder / "notes.pt").write_text("not a checkpoint\n")
    return folder


def calibrate(user: Path, out: Path, *args) -> object:
    base = ["--arch", f"{user / 'model.py'}:build", "--weights", user / "weights.pt", "--data", "digits"]
    return invoke("calibrate", *base, "--out", out, "--calib-n", 64, "--eval-n", 32, *args)


@pytest.mark.parametrize(
    "arch, weights, message",
    [
        ("missing.py:build", "weights.pt", "entry point file not found"),
        ("no_such_package_xyz.models:build", "weights.pt", "module 'no_such_package_xyz.models' not found"),
        ("model.py:nothing", "weights.pt", "has no 'nothing'"),
        ("model.py:broken", "weights.pt", "raised RuntimeError: the user's code failed"),
        ("model.py:not_a_model", "weights.pt", "returned a int, not a torch.nn.Module"),
        ("model.py:build", "narrow.pt", "shape mismatch"),
        ("model.py:build", "notes.pt", "corrupt or not a torch file"),
        ("model.py:branchy", None, "in module 'inner' (Inner)"),
    ],
)
def test_bad_models_are_one_line(user, tmp_path, arch, weights, message):
    module, _, func = arch.rpartition(":")
    spec = f"{user / module}:{func}" if module.endswith(".py") else arch
    args = ["--arch", spec, "--data", "digits", "--out", tmp_path / "out", "--calib-n", 64]
    if weights:
        args += ["--weights", user / weights]
    else:
        torch.manual_seed(0)
        args += ["--weights", _save_branchy(user, tmp_path)]
    result = invoke("calibrate", *args)
    assert_one_line_error(result)
    assert message in result.output, result.output
    assert not (tmp_path / "out").exists()


def _save_branchy(user: Path, tmp_path: Path) -> Path:
    from nenni_deploy.models.entrypoint import call_entrypoint

    path = tmp_path / "branchy.pt"
    torch.save(call_entrypoint(f"{user / 'model.py'}:branchy").state_dict(), path)
    return path


def test_output_width_must_match_the_classes(user, tmp_path):
    out = tmp_path / "out"
    spec = f"{user / 'model.py'}:build"
    result = invoke("train", "--arch", spec, "--arch-kwargs", '{"num_classes": 7}', "--data", "digits", "--out", out)
    assert_one_line_error(result)
    assert "outputs 7 scores per image but the data has 10 classes" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "mean, std, message",
    [
        ("0.5,0.5", "0.2,0.2", "the images have 1 channels"),
        ("0.5", "0", "must be finite and > 0"),
        ("0.5", None, "--mean and --std go together"),
        ("a", "0.2", "--mean takes comma-separated numbers"),
    ],
)
def test_bad_normalisation(user, tmp_path, mean, std, message):
    args = ["--mean", mean] + (["--std", std] if std else [])
    result = calibrate(user, tmp_path / "out", *args)
    assert_one_line_error(result)
    assert message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_bad_arch_kwargs(user, tmp_path):
    result = calibrate(user, tmp_path / "out", "--arch-kwargs", "{width: 3}")
    assert_one_line_error(result)
    assert "--arch-kwargs must be a JSON object" in result.output


# -- data folders -------------------------------------------------------------------------------------------------
def _images(folder: Path, layout: dict[str, dict[str, list[tuple[int, int]]]]) -> Path:
    """layout: split -> class -> list of (height, width) of the images to write."""
    from PIL import Image

    for split, classes in layout.items():
        for name, sizes in classes.items():
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for i, (h, w) in enumerate(sizes):
                Image.fromarray(np.full((h, w), 40 * i, np.uint8)).save(folder / split / name / f"{i}.png")
    return folder


GOOD = {"a": [(8, 8), (8, 8)], "b": [(8, 8)]}


def test_image_folders_load_with_sorted_classes_and_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NENNI_CACHE_DIR", str(tmp_path / "cache"))
    folder = _images(tmp_path / "data", {"train": GOOD, "test": {"b": [(8, 8)], "a": [(8, 8)]}})
    train = load_dataset(str(folder), "train")
    assert train.classes == ("a", "b") and train.input_shape == (1, 8, 8) and train.y.tolist() == [0, 0, 1]
    cached = list((tmp_path / "cache" / "datasets").glob("*.npz"))
    assert len(cached) == 1
    (folder / "train" / "a" / "0.png").unlink()  # a changed folder is decoded again
    assert len(load_dataset(str(folder), "train")) == 2
    assert len(list((tmp_path / "cache" / "datasets").glob("*.npz"))) == 2
    resized = load_dataset(str(folder), "test", image_size=(4, 6))
    assert resized.input_shape == (1, 4, 6)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train": GOOD}, "has no test/"),
        ({"train": GOOD, "test": {"a": [(8, 8)], "b": []}}, "holds no .png/.jpg/.jpeg images"),
        ({"train": GOOD, "test": {"a": [(8, 8)], "c": [(8, 8)]}}, "different classes"),
        ({"train": {"a": [(8, 8)], "b": [(6, 6)]}, "test": GOOD}, "different sizes"),
    ],
)
def test_bad_image_folders(tmp_path, monkeypatch, layout, message):
    monkeypatch.setenv("NENNI_CACHE_DIR", str(tmp_path / "cache"))
    folder = _images(tmp_path / "data", layout)
    for split, classes in layout.items():
        for name, sizes in classes.items():
            if not sizes:
                (folder / split / name).mkdir(parents=True, exist_ok=True)
    with pytest.raises(NenniError, match=message):
        load_dataset(str(folder), "train")


def test_a_corrupt_image_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("NENNI_CACHE_DIR", str(tmp_path / "cache"))
    folder = _images(tmp_path / "data", {"train": GOOD, "test": GOOD})
    (folder / "test" / "b" / "0.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(NenniError, match=r"cannot read image .*test/b/0.png"):
        load_dataset(str(folder), "train")


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2]), "4 images but y has 3 labels"),
        (np.zeros((3, 8, 8, 1), np.uint8), np.array([0, -1, 2]), "labels must be 0..C-1"),
        (np.zeros((3, 8, 8, 1), np.uint8), np.array([0.0, 1.0, 2.0]), "integer labels"),
        (np.full((3, 1, 8, 8), 2.0, np.float32), np.array([0, 1, 2]), "in \\[0, 1\\]"),
        (np.zeros((3, 8, 8, 7), np.uint8), np.array([0, 1, 2]), "1, 3 or 4 channels"),
    ],
)
def test_bad_npz_arrays(tmp_path, x, y, message):
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 8, 8, 1), np.uint8), y=np.array([0, 1]))
    with pytest.raises(NenniError, match=message):
        load_dataset(str(tmp_path), "train")


def test_npz_classes_span_both_splits_and_names_are_kept(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((3, 8, 8, 3), np.uint8), y=np.array([0, 1, 1]))
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.array([4, 0]))
    assert load_dataset(str(tmp_path), "train").num_classes == 5
    names = np.array(["cat", "dog", "eel", "fox", "gnu", "hen"])
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.array([4, 0]), classes=names)
    assert load_dataset(str(tmp_path), "test").classes == tuple(names)


def test_a_data_folder_without_either_layout(tmp_path, user):
    (tmp_path / "empty").mkdir()
    result = calibrate(user, tmp_path / "out", "--data", tmp_path / "empty")
    assert_one_line_error(result)
    assert "neither train.npz/test.npz nor train/ and test/" in result.output


def test_npz_folder_missing_a_split(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 8, 8, 1), np.uint8), y=np.array([0, 1]))
    with pytest.raises(NenniError, match="has no test.npz"):
        load_dataset(str(tmp_path), "train")
