"""Export of the shared ResNet-20 (CIFAR-10): parity with PyTorch on real test images (skipped without ../shared)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export_support import card_for, run

from nenni_deploy.data import load_dataset
from nenni_deploy.exporters import graph, ops
from nenni_deploy.exporters.export import ExportOptions, build_onnx
from nenni_deploy.models import create_model
from nenni_deploy.nenni import convert, fit
from nenni_deploy.nenni.config import NenniConfig
from nenni_deploy.runtime import check_proto
from nenni_deploy.runtime.parity import check_parity, torch_reference

pytestmark = [pytest.mark.shared, pytest.mark.slow]
SHAPE = (3, 32, 32)
IMAGES = 128


@pytest.fixture(scope="module")
def cifar_test(cifar10_dir):
    test = load_dataset("cifar10", "test", cifar10_dir)
    return test.x[:IMAGES], test.y[:IMAGES]


@pytest.fixture(scope="module")
def resnet20_channel_noise(cifar10_dir, weights_dir):
    """ResNet-20, channel granularity 0.5, k = n/8, Gaussian noise, fitted on 256 test images that the
    comparison does not use (loading the training set would cost more than the fit)."""
    torch.manual_seed(0)
    model = create_model("resnet20", weights=weights_dir / "akamaster/resnet20-12fca82f.th")
    config = NenniConfig(granularity="channel", ratio=0.5, proj_dim="n/8", noise="gaussian")
    specs = convert.convert(model, config)
    calib = load_dataset("cifar10", "test", cifar10_dir).x[-256:]
    fit.fit(model, [calib[:128], calib[128:]], progress=False)
    card = card_for(model, config, specs, "resnet20", "cifar10")
    return model, card, build_onnx(model, card, SHAPE, ExportOptions())


def test_resnet20_channel_export_matches_pytorch(resnet20_channel_noise, cifar_test):
    model, _, result = resnet20_channel_noise
    proto = result.proto
    assert len(graph.nenni_nodes(proto, ops.LAYER_OPS)) == 18 and len(graph.nenni_nodes(proto, (ops.NOISE,))) == 18
    assert {f.overload for f in proto.functions if f.name == ops.CONV} == {
        "channel_signed_k3x3",
        "channel_magnitude_k3x3",
    }
    x, y = cifar_test
    report = check_parity(model, check_proto(proto), x, y, batch_size=128)
    assert report.agreement >= 99.2, report  # at most one flip in 128
    assert abs(report.accuracy_torch - report.accuracy_onnx) <= 0.8
    assert report.noise["seeded_equal"] and report.noise["unseeded_runs_differ"]
    assert all(layer["ok"] for layer in report.noise["layers"]), report.noise["layers"]


def test_resnet20_dense_export_matches_pytorch(resnet20_channel_noise, cifar_test):
    model, card, _ = resnet20_channel_noise
    proto = build_onnx(model, card, SHAPE, ExportOptions(dense=True)).proto
    assert not graph.nenni_nodes(proto)
    x, y = cifar_test
    with torch.no_grad():
        expected = torch_reference(model, dense=True, noise=False)(x).numpy()
    logits = run(proto, x)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    assert (logits.argmax(1) == y.numpy()).mean() > 0.85  # the real pretrained ResNet-20
