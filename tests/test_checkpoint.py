"""Checkpoint loading from every wrapping we meet in the wild, and refusal of anything that runs code."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nenni_deploy.errors import NenniError
from nenni_deploy.models import create_model, load_checkpoint, save_state_dict


class NotATensor:
    """Unpickling an instance of this needs the class: code from outside the tensor format."""


def _source() -> nn.Module:
    torch.manual_seed(1)
    model = create_model("small_cnn")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    return model


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (key, left), right in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(left, right, msg=key)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3, "best_prec1": 91.7}, id="state_dict"),
        pytest.param(lambda sd: {"model": sd, "optimizer_name": "sgd"}, id="model"),
        pytest.param(lambda sd: {"state_dict": {"model": sd}}, id="nested"),
        pytest.param(lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, id="data_parallel"),
        pytest.param(lambda sd: {**sd, "note": "trained on digits", "step": 7}, id="non_tensor_entries"),
    ],
)
def test_torch_checkpoints_load(tmp_path: Path, wrap: Any) -> None:
    source = _source()
    path = tmp_path / "weights.pt"
    torch.save(wrap(source.state_dict()), path)
    target = create_model("small_cnn")
    assert load_checkpoint(target, path) is target
    _assert_same_weights(source, target)


def test_safetensors_round_trip_is_atomic(tmp_path: Path) -> None:
    source = _source()
    umask = os.umask(0o022)
    try:
        path = save_state_dict(source, tmp_path / "sub" / "weights.safetensors")
    finally:
        os.umask(umask)
    assert sorted(os.listdir(path.parent)) == ["weights.safetensors"], "no temporary file is left behind"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "the usual permissions, not owner-only"
    _assert_same_weights(source, create_model("small_cnn", weights=path))


def test_save_state_dict_accepts_a_dict(tmp_path: Path) -> None:
    source = _source()
    path = save_state_dict(dict(source.state_dict()), tmp_path / "w.safetensors")
    _assert_same_weights(source, load_checkpoint(create_model("small_cnn"), path))


def test_batchnorm_counters_are_optional(tmp_path: Path) -> None:
    """Old checkpoints (the akamaster ResNets) have no num_batches_tracked; BatchNorm fills it in."""
    source = _source()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    _assert_same_weights(source, create_model("small_cnn", weights=tmp_path / "old.pt"))


def test_key_mismatch_is_one_line_naming_missing_and_unexpected(tmp_path: Path) -> None:
    state = create_model("resnet20").state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "r20.pt")
    target = create_model("resnet32")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(NenniError) as info:
        load_checkpoint(target, tmp_path / "r20.pt")
    message = str(info.value)
    assert "\n" not in message
    assert "missing keys [layer1.3.conv1.weight" in message
    assert "more)" in message, "long key lists are truncated"
    assert "unexpected keys [extra.weight]" in message
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), "a failed load leaves the model untouched"


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    torch.save(create_model("small_cnn").state_dict(), tmp_path / "w.pt")
    with pytest.raises(NenniError, match=r"linear\.weight \(10, 32\) in the file vs \(5, 32\) in the model"):
        create_model("small_cnn", num_classes=5, weights=tmp_path / "w.pt")


def test_non_strict_loading_ignores_missing_and_extra_keys(tmp_path: Path) -> None:
    source = _source()
    state = dict(source.state_dict())
    del state["linear.bias"]
    state["head.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "partial.pt")
    target = load_checkpoint(create_model("small_cnn"), tmp_path / "partial.pt", strict=False)
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight)


def test_a_pickle_that_needs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _source().state_dict(), "payload": NotATensor()}, path)
    with pytest.raises(NenniError, match=r"refusing checkpoint .*NotATensor") as info:
        load_checkpoint(create_model("small_cnn"), path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["missing.pt", "missing.safetensors"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    with pytest.raises(NenniError, match="checkpoint not found"):
        load_checkpoint(create_model("small_cnn"), tmp_path / name)


@pytest.mark.parametrize("name", ["corrupt.pt", "corrupt.safetensors"])
def test_corrupt_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"not a checkpoint at all" * 4)
    with pytest.raises(NenniError, match="cannot read") as info:
        load_checkpoint(create_model("small_cnn"), path)
    assert "\n" not in str(info.value)


def test_a_file_without_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(NenniError, match="holds no tensors"):
        load_checkpoint(create_model("small_cnn"), tmp_path / "empty.pt")
