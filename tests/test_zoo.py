"""Users' own models and data: five architectures unlike the built-in ones (tests/zoo), trained outside the
project with plain PyTorch, given as `file.py:build` + `weights.pt` and a folder data set (npz arrays or image
folders, one with --mean/--std), through calibrate, finetune, export, check, plain onnxruntime and eval; two
through the Python API. The model directories are moved and the entry point deleted before they are reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _cli import invoke

import nenni_deploy as nd

ZOO = Path(__file__).resolve().parent / "zoo"
DIGITS_MEAN, DIGITS_STD = (0.3,), (0.37,)


# -- data folders, written the way a user would have them ---------------------------------------------------------
def _digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits as uint8 NHWC (8x8, one channel)."""
    out = {}
    for split in ("train", "test"):
        ds = nd.load_dataset("digits", split)
        out[split] = ((ds.x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), ds.y.numpy())
    return out


def _synthetic_12(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """12 classes of 10x14 colour images: a class-specific blob position and colour, plus noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", 1200), ("test", 360)):
        y = rng.integers(0, 12, n)
        x = rng.normal(0.3, 0.12, (n, 10, 14, 3))
        for i, label in enumerate(y):
            r, c = 1 + (label % 4) * 2, 1 + (label // 4) * 4
            x[i, r : r + 3, c : c + 4, label % 3] += 0.6
        out[split] = ((np.clip(x, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64))
    return out


def write_npz(folder: Path, arrays, as_float: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in arrays.items():
        if as_float:  # float32 NCHW in [0, 1]
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
        np.savez(folder / f"{split}.npz", x=x, y=y)
    return folder


def write_image_folders(folder: Path, arrays) -> Path:
    from PIL import Image

    for split, (x, y) in arrays.items():
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            target = folder / split / f"class_{label:02d}"
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(target / f"{i:05d}.png")
    return folder


# -- training outside the project ---------------------------------------------------------------------------------
def train_outside(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, mean=None, std=None):
    """A user's own loop: Adam on uint8 NHWC arrays, normalised the way the user's pipeline does."""
    torch.manual_seed(0)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    if mean is not None:
        xt = (xt - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    yt = torch.from_numpy(y).long()
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(module(xt[idx]), yt[idx]).backward()
            opt.step()
    return module.eval()


def own_accuracy(module, x: np.ndarray, y: np.ndarray, mean=None, std=None) -> float:
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    if mean is not None:
        xt = (xt - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return float((module(xt).argmax(1).numpy() == y).mean() * 100)


def load_entry(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"zoo_{path.stem}_outside", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def onnxruntime_accuracy(onnx_path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Plain onnxruntime, nothing of this project: images in [0, 1], logits out."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + 128].numpy()})[0] for i in range(0, len(x), 128)])
    return float((logits.argmax(1) == y.numpy()).mean() * 100)


# -- the command-line flow ----------------------------------------------------------------------------------------
CASES = {
    # name: (zoo file, data writer, arch kwargs, normalisation, outside-training epochs, calibrate extras)
    "vgg": ("vgg.py", "images", {"width": 8}, True, 6, []),
    "mobile": ("mobile.py", "npz-uint8", {}, False, 6, ["--granularity", "nm", "--nm", "2:4"]),
    "nonorm": ("nonorm.py", "npz-float", {}, False, 8, ["--granularity", "element"]),
}


def _data_folder(tmp: Path, kind: str) -> Path:
    arrays = _digits()
    if kind == "images":
        return write_image_folders(tmp / "data", arrays)
    return write_npz(tmp / "data", arrays, as_float=kind == "npz-float")


@pytest.mark.parametrize(
    "case", ["vgg", pytest.param("mobile", marks=pytest.mark.slow), pytest.param("nonorm", marks=pytest.mark.slow)]
)
def test_users_model_through_every_command(tmp_path, case):
    file, data_kind, kwargs, normalised, epochs, extras = CASES[case]
    user = tmp_path / "user"
    user.mkdir()
    entry = user / file
    shutil.copy(ZOO / file, entry)
    data = _data_folder(tmp_path, data_kind)
    arrays = _digits()
    mean, std = (DIGITS_MEAN, DIGITS_STD) if normalised else (None, None)
    module = train_outside(load_entry(entry)(**kwargs), *arrays["train"], epochs=epochs, mean=mean, std=std)
    torch.save(module.state_dict(), user / "weights.pt")
    expected_dense = own_accuracy(module, *arrays["test"], mean=mean, std=std)

    norm = ["--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std))] if normalised else []
    calibrated, calib_json = tmp_path / "calibrated", tmp_path / "calibrate.json"
    result = invoke(
        "calibrate", "--arch", f"{entry}:build", "--arch-kwargs", json.dumps(kwargs), "--weights",
        user / "weights.pt", "--data", data, *norm, "--ratio", "0.5", "--calib-n", 512, "--out", calibrated,
        "--json", calib_json, *extras,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(calib_json.read_text())
    assert report["dense_accuracy"] == pytest.approx(expected_dense, abs=1e-9)
    assert report["layers"] and "left dense because" in result.output
    if case == "mobile":
        assert any("depthwise" in d["reason"] for d in report["dense_layers"])

    # The user's file and checkout are gone: the directory must rebuild from its own copy.
    moved = tmp_path / "elsewhere" / "calibrated"
    shutil.move(str(calibrated), moved)
    shutil.rmtree(user)
    tuned, tune_json = tmp_path / "tuned", tmp_path / "finetune.json"
    result = invoke(
        "finetune", moved, "--epochs", 1, "--lr", 0.005, "--out", tuned, "--json", tune_json, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    after = json.loads(tune_json.read_text())["nenni_accuracy_after"]

    onnx_path = tmp_path / "model.onnx"
    result = invoke("export", tuned, "--out", onnx_path)
    assert result.exit_code == 0, result.output
    result = invoke("check", tuned, onnx_path)
    assert result.exit_code == 0 and "check passed" in result.output, result.output
    test = nd.load_dataset(str(data), "test")
    assert onnxruntime_accuracy(onnx_path, test.x, test.y) == pytest.approx(after, abs=0.5)
    dense_onnx = tmp_path / "dense.onnx"
    assert invoke("export", tuned, "--dense", "--out", dense_onnx).exit_code == 0
    assert onnxruntime_accuracy(dense_onnx, test.x, test.y) == pytest.approx(expected_dense, abs=0.25)

    eval_json = tmp_path / "eval.json"
    result = invoke(
        "eval", tuned, "--n", 40, "--attack", "pgd,bpda", "--eps", "0.1", "--steps", 5, "--json", eval_json,
        "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "0.1" in json.loads(eval_json.read_text())["worst_case"]


# -- the Python API -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dense", pytest.param("wide", marks=pytest.mark.slow)])
def test_users_model_through_the_python_api(tmp_path, case):
    if case == "dense":
        arrays, file, kwargs = _digits(), "dense.py", {}
        folder = write_image_folders(tmp_path / "data", arrays)
    else:
        arrays, file, kwargs = _synthetic_12(), "wide.py", {"num_classes": 12}
        folder = write_npz(tmp_path / "data", arrays)
    module = train_outside(load_entry(ZOO / file)(**kwargs), *arrays["train"], epochs=6)
    torch.save(module.state_dict(), tmp_path / "weights.pt")

    train, test = nd.load_dataset(str(folder), "train"), nd.load_dataset(str(folder), "test")
    assert test.input_shape == ((1, 8, 8) if case == "dense" else (3, 10, 14))
    model = nd.load_model(f"{ZOO / file}:build", weights=tmp_path / "weights.pt", kwargs=kwargs, data=train)
    calibration = nd.calibrate(model, train, test, nd.CalibrateConfig(nd.NenniConfig(ratio=0.5), calib_n=512))
    assert calibration.calibration.dense_accuracy == pytest.approx(own_accuracy(module, *arrays["test"]))
    assert json.dumps(calibration.to_json())
    out = calibration.save(tmp_path / "nenni")

    config = nd.FinetuneConfig(nd.TrainConfig(epochs=1, lr=0.005), progress=False)
    tuned = nd.finetune(nd.open_model_dir(out), train, test, config, tmp_path / "tuned" / "train")
    tuned.save(tmp_path / "tuned")
    assert json.dumps(tuned.to_json())
    report = nd.export_onnx(nd.open_model_dir(tmp_path / "tuned"), tmp_path / "m.onnx")
    assert report.parity.agreement >= 99.0 and json.dumps(report.to_json())
    assert onnxruntime_accuracy(tmp_path / "m.onnx", test.x, test.y) == pytest.approx(
        tuned.record["nenni_accuracy_after"], abs=0.5
    )
