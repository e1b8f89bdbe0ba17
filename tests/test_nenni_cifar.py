"""NENNI on the real shared checkpoints and CIFAR-10 (skipped where ../shared is absent)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from nenni_deploy.cli import main
from nenni_deploy.data import load_dataset
from nenni_deploy.models import create_model
from nenni_deploy.nenni.calibrate import calibrate
from nenni_deploy.nenni.config import NenniConfig
from nenni_deploy.nenni.io import load_model_dir
from nenni_deploy.nenni.layers import nenni_layers, set_execution, set_mode

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def cifar(cifar10_dir):
    return load_dataset("cifar10", "train", cifar10_dir), load_dataset("cifar10", "test", cifar10_dir)


@pytest.fixture(scope="module")
def resnet20_channel(cifar, weights_dir):
    train, test = cifar
    model = create_model("resnet20", weights=weights_dir / "akamaster/resnet20-12fca82f.th")
    config = NenniConfig(granularity="channel", ratio=0.5, proj_dim="n/4")
    return calibrate(model, config, train.x, test.x[:256], test.y[:256], calib_n=256, batch_size=128, progress=False)


def test_resnet20_calibration_structure_and_cost(resnet20_channel):
    result = resnet20_channel
    assert len(result.specs) == 18  # every conv but the first; the classifier stays dense
    ranks = {s.name: s.rank for s in result.specs}
    assert ranks["layer1.0.conv2"] == "magnitude" and ranks["layer1.0.conv1"] == "signed"
    totals = result.cost["totals"]
    assert totals["macs_dense"] == 40_551_040  # the README's "about 41 M MACs per image"
    assert 0 < totals["macs_nenni"] < totals["macs_dense"]
    assert result.dense_accuracy > 85
    assert all(0 < f.rel_error < 1.0 for f in result.fits)


def test_resnet20_masked_and_skipping_agree(resnet20_channel, cifar):
    model = resnet20_channel.model
    x = cifar[1].x[:64]
    with torch.no_grad():
        masked = model(x)
        set_execution(model, "skip")
        try:
            skipped = model(x)
        finally:
            set_execution(model, "masked")
    torch.testing.assert_close(skipped, masked, atol=1e-4, rtol=1e-4)
    assert (skipped.argmax(1) == masked.argmax(1)).all()


def test_calibrate_command_writes_model_dir_and_json(tmp_path, cifar10_dir, weights_dir):
    out, js = tmp_path / "r20", tmp_path / "r20.json"
    result = CliRunner().invoke(
        main,
        [
            "calibrate",
            "--arch",
            "resnet20",
            "--weights",
            str(weights_dir / "akamaster/resnet20-12fca82f.th"),
            "--data",
            "cifar10",
            "--data-dir",
            str(cifar10_dir),
            "--ratio",
            "0.5",
            "--granularity",
            "nm",
            "--nm",
            "4:8",
            "--proj-dim",
            "n/4",
            "--calib-n",
            "128",
            "--eval-n",
            "128",
            "--out",
            str(out),
            "--json",
            str(js),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(js.read_text())
    for key in (
        "dense_accuracy",
        "nenni_accuracy",
        "macs_dense",
        "macs_nenni",
        "bitops_dense",
        "bitops_nenni",
        "fit_seconds",
        "config",
    ):
        assert key in summary
    assert summary["config"]["granularity"] == "nm" and summary["config"]["nm"] == "4:8"
    assert summary["bitops_nenni"] < summary["bitops_dense"]
    model, card = load_model_dir(out)
    assert len(nenni_layers(model)) == 18 and card["metrics"]["nenni_accuracy"] == summary["nenni_accuracy"]
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "layer1.0.conv1" in info.output
    set_mode(model, "exact")
    dense = create_model("resnet20", weights=weights_dir / "akamaster/resnet20-12fca82f.th").eval()
    x = load_dataset("cifar10", "test", cifar10_dir).x[:16]
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-4, rtol=1e-4)
