"""Whole-model export: parity with PyTorch for every granularity and noise mode, graph hygiene, targets, files."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from test_export_support import TINY_SHAPE, card_for, run, session, tiny_nenni
from torch import nn

from nenni_deploy.errors import NenniError
from nenni_deploy.exporters import graph, ops
from nenni_deploy.exporters.export import ExportLayer, ExportOptions, build_onnx, export_module, export_to_file
from nenni_deploy.nenni import convert, fit
from nenni_deploy.nenni.config import NenniConfig
from nenni_deploy.nenni.layers import nenni_layers, set_execution
from nenni_deploy.runtime import check_proto, load_onnx_checked
from nenni_deploy.runtime.parity import check_parity, torch_reference

X = torch.rand(40, *TINY_SHAPE, generator=torch.Generator().manual_seed(1))

_CACHE: dict = {}


def exported(granularity: str, noise_mode: str = "none", **options):
    """(model, card, ExportedModel), cached across tests: torch exports take about a second each."""
    key = (granularity, noise_mode, tuple(sorted(options.items())))
    if key not in _CACHE:
        model, card = tiny_nenni(granularity, noise_mode)
        _CACHE[key] = (model, card, build_onnx(model, card, TINY_SHAPE, ExportOptions(**options)))
    return _CACHE[key]


def torch_logits(model, dense=False, noise=False) -> np.ndarray:
    with torch.no_grad():
        return torch_reference(model, dense=dense, noise=noise)(X).numpy()


def assert_hygienic(proto: onnx.ModelProto) -> None:
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    assert graph.dead_nodes(proto) == []
    initializers = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:  # constant folding: no standard node computes from constants alone
        if node.domain in ("", "ai.onnx") and node.op_type != "Constant" and node.input:
            assert not all(i in initializers for i in node.input if i), f"foldable node {node.name}"
    digests = [hashlib.sha256(numpy_helper.to_array(t).tobytes() + str(t.dims).encode()).hexdigest()
               for t in proto.graph.initializer]  # fmt: skip
    assert len(digests) == len(set(digests)), "duplicate initializers"
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert "[0, 1]" in proto.graph.input[0].doc_string and proto.graph.output[0].doc_string


@pytest.mark.parametrize("granularity", ops.GRANULARITIES)
def test_parity_and_hygiene_for_every_granularity(granularity):
    model, card, result = exported(granularity)
    proto = result.proto
    assert_hygienic(proto)
    layers = graph.nenni_nodes(proto, ops.LAYER_OPS)
    assert len(layers) == len(nenni_layers(model)) == 4  # block conv1/conv2, down, fc1
    assert {n.op_type for n in layers} == {ops.CONV, ops.LINEAR}
    assert {n.name for n in layers} == set(nenni_layers(model))  # named after the PyTorch modules
    used = {(n.op_type, n.overload) for n in layers}
    assert used == {(f.name, f.overload) for f in proto.functions}  # exactly the bodies it calls
    conv = "_k3x3" if granularity == "channel" else ""  # channel convolutions get the kernel-specific body
    assert (ops.LINEAR, f"{granularity}_signed") in used
    assert (ops.CONV, f"{granularity}_magnitude{conv}") in used  # the block's conv2 feeds the residual add
    y = run(proto, X)
    expected = torch_logits(model)
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-4)
    assert (y.argmax(1) == expected.argmax(1)).all()


def test_dynamic_batch_axis_any_batch_size():
    model, _, result = exported("channel")
    sess = session(result.proto)
    expected = torch_logits(model)
    for batch in (1, 3, 40):
        np.testing.assert_allclose(run(result.proto, X[:batch], sess), expected[:batch], atol=1e-4, rtol=1e-4)


def test_channel_export_matches_skip_execution():
    model, _, result = exported("channel")
    ref = torch_reference(model, dense=False, noise=False)
    set_execution(ref, "skip")
    with torch.no_grad():
        np.testing.assert_allclose(run(result.proto, X), ref(X).numpy(), atol=1e-4, rtol=1e-4)


def test_metadata_records_config_version_and_weight_hashes():
    model, card, result = exported("nm")
    meta = graph.read_metadata(result.proto)
    assert meta["nenni.domain"] == ops.DOMAIN and meta["nenni.domain_version"] == "1"
    assert json.loads(meta["nenni.config"]) == card["nenni"]
    assert len(json.loads(meta["nenni.layers"])) == 4
    assert meta["nenni.weights_sha256"] == card["weights_sha256"]
    assert meta["nenni.projection_sha256"] == card["projection_sha256"]
    assert meta["nenni.onnx_weights_sha256"] == graph.initializer_sha256(result.proto)
    assert meta["nenni_deploy.version"] and meta["nenni.target"] == "ort" and meta["nenni.dense"] == "false"
    assert result.proto.opset_import and graph.model_opset(result.proto) == 18


@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_noise_export_parity_and_noise_checks(granularity):
    model, card, result = exported(granularity, "gaussian")
    proto = result.proto
    assert_hygienic(proto)
    noise_nodes = graph.nenni_nodes(proto, (ops.NOISE,))
    assert len(noise_nodes) == 4
    assert all(not any(a.name == "seed" for a in n.attribute) for n in noise_nodes)  # unseeded by default
    report = check_parity(model, check_proto(proto), X, batch_size=16)
    assert report.max_abs_diff < 1e-4 and report.agreement == 100.0
    assert report.noise["seeded_equal"] and report.noise["unseeded_runs_differ"]
    for layer in report.noise["layers"]:
        assert layer["ok"], layer
    assert report.noise_ok


def test_no_noise_option_and_zero_std_layers_leave_noise_out():
    model, _ = tiny_nenni("channel", "gaussian")
    stand_ins = [m for m in export_module(model, ExportOptions(noise=False)).modules() if isinstance(m, ExportLayer)]
    assert len(stand_ins) == 4 and not any(m.noise for m in stand_ins)
    assert all(m.noise for m in export_module(model, ExportOptions()).modules() if isinstance(m, ExportLayer))
    for layer in nenni_layers(model).values():
        layer.residual_rms.fill_(0.0)  # noise of std 0 is no noise: no node (and never RandomNormalLike scale 0)
    assert not any(m.noise for m in export_module(model, ExportOptions()).modules() if isinstance(m, ExportLayer))


def test_dense_export_is_the_base_model_and_leaves_the_model_untouched():
    model, card = tiny_nenni("channel")
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        y0 = model(X)
    proto = build_onnx(model, card, TINY_SHAPE, ExportOptions(dense=True)).proto
    assert all(layer.mode == "nenni" for layer in nenni_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(X), y0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_hygienic(proto)
    assert not graph.nenni_nodes(proto) and not proto.functions
    assert all(o.domain != ops.DOMAIN for o in proto.opset_import)
    assert graph.read_metadata(proto)["nenni.dense"] == "true"
    np.testing.assert_allclose(run(proto, X), torch_logits(model, dense=True), atol=1e-4, rtol=1e-4)


def test_tensorrt_target_carries_plugin_attributes_and_no_functions():
    model, _, result = exported("channel", "gaussian", target="tensorrt", noise_seed=42)
    proto = result.proto
    onnx.checker.check_model(proto, full_check=True)  # the registered schema knows the plugin attributes
    assert not proto.functions
    nodes = graph.nenni_nodes(proto)
    assert len(nodes) == 8
    for node in nodes:
        attrs = {a.name: a.s.decode() for a in node.attribute if a.name.startswith("plugin_")}
        assert attrs == {"plugin_namespace": ops.PLUGIN_NAMESPACE, "plugin_version": ops.PLUGIN_VERSION}
        assert node.overload == ""
    with pytest.raises(NenniError, match="TensorRT-target"):
        check_proto(proto)
    runnable = graph.to_ort_form(proto)  # the same graph with its bodies, for checking on CPU
    np.testing.assert_allclose(run(graph.without_noise(runnable), X), torch_logits(model), atol=1e-4, rtol=1e-4)
    # --noise-seed: one distinct seed per layer, and fresh sessions replay the same noise
    seeds = [next(a.f for a in n.attribute if a.name == "seed") for n in graph.nenni_nodes(proto, (ops.NOISE,))]
    assert len(set(seeds)) == len(seeds) == 4
    assert graph.read_metadata(proto)["nenni.noise_seed"] == "42"
    a, b = run(runnable, X), run(runnable, X)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - torch_logits(model)).max() > 0  # there is noise


def test_other_opset_and_unsupported_opset():
    model, _, result = exported("nm", opset=21)
    assert graph.model_opset(result.proto) == 21
    assert all(f.opset_import[0].version == 21 for f in result.proto.functions)
    np.testing.assert_allclose(run(result.proto, X), torch_logits(model), atol=1e-4, rtol=1e-4)
    with pytest.raises(NenniError, match="opset"):
        build_onnx(model, {}, TINY_SHAPE, ExportOptions(opset=17))
    with pytest.raises(NenniError, match="target"):
        build_onnx(model, {}, TINY_SHAPE, ExportOptions(target="coreml"))


def test_one_file_and_external_data(tmp_path):
    model, card, result = exported("threshold")
    one = export_to_file(model, card, TINY_SHAPE, tmp_path / "one.onnx", ExportOptions(), exported=result)
    assert one.files == [tmp_path / "one.onnx"]
    split = export_to_file(
        model, card, TINY_SHAPE, tmp_path / "m" / "split.onnx", ExportOptions(), external_data=True, exported=result
    )
    assert [f.name for f in split.files] == ["split.onnx", "split.onnx.data"]
    assert (tmp_path / "m" / "split.onnx").stat().st_size < (tmp_path / "one.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "one.onnx"]  # no temporary files left
    loaded = load_onnx_checked(tmp_path / "m" / "split.onnx")
    np.testing.assert_allclose(run(loaded.proto, X), run(load_onnx_checked(tmp_path / "one.onnx").proto, X))


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model, card, result = exported("threshold")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(NenniError, match="No space left"):
        export_to_file(model, card, TINY_SHAPE, tmp_path / "m.onnx", ExportOptions(), exported=result)
    assert list(tmp_path.iterdir()) == []


# -- property test: many random small conv nets --------------------------------------------------------------
class RandomNet(nn.Module):
    def __init__(self, c_in: int, widths: list[int], kernels: list[int], strides: list[int], dilations: list[int]):
        super().__init__()
        layers, c = [], c_in
        for w, k, s, d in zip(widths, kernels, strides, dilations, strict=True):
            layers += [nn.Conv2d(c, w, k, stride=s, padding=d * (k // 2), dilation=d, bias=False), nn.BatchNorm2d(w)]
            layers.append(nn.ReLU())
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.features(x).mean((2, 3)))))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(2, 3),
    width=st.sampled_from([4, 8]),
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    side=st.integers(7, 12),
    granularity=st.sampled_from(ops.GRANULARITIES),
    rank=st.sampled_from(["signed", "magnitude"]),
    proj=st.sampled_from(["n/2", "n", "2"]),
    seed=st.integers(0, 1000),
)
def test_random_conv_nets_export_with_parity(depth, width, kernel, stride, dilation, side, granularity, rank, proj,
                                             seed):  # fmt: skip
    torch.manual_seed(seed)
    widths = [width * (1 + i % 2) for i in range(depth)]
    net = RandomNet(3, widths, [kernel] * depth, [1] + [stride] * (depth - 1), [dilation] * depth).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    config = NenniConfig(
        granularity=granularity, ratio=0.5, proj_dim=proj, nm=(2, 4), rank=rank, include=["*"], exclude=["head"]
    )
    specs = convert.convert(net, config)
    x = torch.rand(32, 3, side, side)
    fit.fit(net, [x[:16], x[16:]], progress=False)
    result = build_onnx(net, card_for(net, config, specs, "random"), (3, side, side), ExportOptions())
    assert len(graph.nenni_nodes(result.proto, ops.LAYER_OPS)) == depth + 1
    y = run(result.proto, x)
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lowering", ["masked", "tune"])
def test_channel_lowerings_give_the_same_model(lowering):
    model, card, skip = exported("channel")
    options = ExportOptions(channel_lowering=lowering, tune_batch=2)
    result = build_onnx(model, card, TINY_SHAPE, options)
    meta = graph.read_metadata(result.proto)
    overloads = json.loads(meta["nenni.overloads"])
    convs = [n.name for n in graph.nenni_nodes(result.proto, (ops.CONV,))]
    if lowering == "masked":
        assert all(overloads[name].endswith("_masked") for name in convs)
    else:
        tuning = json.loads(meta["nenni.tuning"])
        assert tuning["batch"] == 2 and [t["name"] for t in tuning["layers"]] == convs
        for t in tuning["layers"]:
            faster = "skip" if t["skip_ms"] <= t["masked_ms"] else "masked"
            assert overloads[t["name"]].endswith("_masked") == (faster == "masked")
            assert t["input_shape"][0] == 2
    np.testing.assert_allclose(run(result.proto, X), run(skip.proto, X), atol=2e-5, rtol=1e-5)


def test_channel_lowering_is_validated():
    model, card, _ = exported("channel")
    with pytest.raises(NenniError, match="--channel-lowering"):
        build_onnx(model, card, TINY_SHAPE, ExportOptions(channel_lowering="fast"))
