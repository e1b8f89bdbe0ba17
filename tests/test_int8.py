"""int8 exports (exporters/int8.py, exporters/ops_int8.py): what runs on integers, metadata, parity within the
int8 tolerance, the commands on int8 files, and the bad-input catalogue. No timing is asserted here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from test_export_support import TINY_SHAPE, run, tiny_nenni

import nenni_deploy as nd
from nenni_deploy.cli import main
from nenni_deploy.errors import NenniError
from nenni_deploy.exporters import graph, ops
from nenni_deploy.exporters.export import ExportOptions, build_onnx
from nenni_deploy.exporters.int8 import Int8Settings, check_calibration_images, quantize_int8
from nenni_deploy.models import create_model, save_state_dict
from nenni_deploy.runtime import OrtRunner, check_proto
from nenni_deploy.runtime.parity import INT8_TOLERANCE, check_parity, parity_failure, tolerance_for

CALIB = torch.rand(64, *TINY_SHAPE, generator=torch.Generator().manual_seed(3)).numpy()
X = torch.rand(64, *TINY_SHAPE, generator=torch.Generator().manual_seed(4))
FAST = Int8Settings(calib_n=64)

_CACHE: dict = {}


def quantized(granularity: str, lowering: str = "skip", dense: bool = False, noise: str = "none"):
    """(model, float ExportedModel, Int8Result), cached: each export and calibration takes a few seconds."""
    key = (granularity, lowering, dense, noise)
    if key not in _CACHE:
        model, card = tiny_nenni(granularity, noise)
        exported = build_onnx(model, card, TINY_SHAPE, ExportOptions(dense=dense, channel_lowering=lowering))
        bits = {s["name"]: s["approx_bits"] for s in card["layers"]}
        _CACHE[key] = (model, exported, quantize_int8(exported.proto, CALIB, FAST, approx_bits=bits))
    return _CACHE[key]


CASES = [("element", "skip"), ("threshold", "skip"), ("nm", "skip"), ("channel", "skip"), ("channel", "masked")]


@pytest.mark.parametrize("granularity, lowering", CASES)
def test_every_nenni_layer_runs_its_int8_form_and_stays_within_tolerance(granularity, lowering):
    model, exported, result = quantized(granularity, lowering)
    counts = result.counts
    layers = graph.nenni_nodes(result.proto, ops.LAYER_OPS)
    assert counts["nenni_layers_int8"] == counts["nenni_layers"] == len(layers) == 4
    assert all(n.overload.endswith("_int8") for n in layers)
    assert counts["float_compute_total"] == 0, counts  # no Conv, Gemm or MatMul left in float
    if granularity == "channel" and lowering == "skip":
        # 3 convolutions and 1 linear layer, each: projection, approximator and the gathered exact filters
        assert counts["integer_kernels"]["MatMulInteger"] == 12
        assert {n.overload for n in layers} == {"channel_signed_k3x3_int8", "channel_magnitude_k3x3_int8",
                                                "channel_signed_int8"}  # fmt: skip
    else:  # projection and exact path as fused QDQ groups, the approximator by MatMulInteger
        assert counts["integer_kernels"]["MatMulInteger"] == 4
        assert counts["integer_kernels"]["QLinearConv"] >= 6 and counts["integer_kernels"]["QGemm"] >= 2
    report = check_parity(model, check_proto(result.proto), X)
    assert report.precision == "int8" and parity_failure(report, INT8_TOLERANCE) is None
    assert report.relative_error < 0.03  # 0.5 % measured on these tiny models
    float_logits, int8_logits = run(exported.proto, X), run(result.proto, X)
    assert np.abs(float_logits - int8_logits).mean() / np.abs(float_logits).mean() < 0.03


def test_dense_int8_and_the_calibration_metadata():
    _, exported, result = quantized("channel", dense=True)
    counts = result.counts
    assert counts["nenni_layers"] == 0 and counts["float_compute_total"] == 0
    assert counts["integer_kernels"]["QLinearConv"] == 4 and counts["integer_kernels"]["QGemm"] == 2
    meta = graph.read_metadata(result.proto)
    assert meta["nenni.precision"] == "int8" and meta["nenni.dense"] == "true"
    assert graph.read_metadata(exported.proto)["nenni.precision"] == "float32"
    recorded = json.loads(meta["nenni.int8"])
    assert recorded["method"] == "minmax" and recorded["images"] == 64 and "reduce_range" in recorded
    assert meta["nenni.cost"] == graph.read_metadata(exported.proto)["nenni.cost"]  # MACs as before
    assert json.dumps(result.to_json())


def test_int8_attributes_are_calibrated_per_layer():
    _, _, result = quantized("channel")
    for node, layer in zip(graph.nenni_nodes(result.proto, ops.LAYER_OPS), result.calibration["nenni_layers"],
                           strict=True):  # fmt: skip
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert layer["layer"] == node.name and attrs["x_scale"] == pytest.approx(layer["x_scale"])
        assert attrs["x_scale"] > 0 and attrs["u_scale"] > 0 and 0 <= attrs["u_zero_point"] <= 255
        assert attrs["w_bits"] == 8 and attrs["approx_bits"] == 8  # u8 x u8 bodies: no saturation, full range


def test_noise_models_keep_float_noise_on_int8_layers():
    model, _, result = quantized("channel", noise="gaussian")
    assert graph.nenni_nodes(result.proto, (ops.NOISE,))
    report = check_parity(model, check_proto(result.proto), X)
    assert report.compared.startswith("without noise") and report.noise_ok
    assert report.agreement >= INT8_TOLERANCE.min_agreement


def test_settings_percentile_and_entropy_calibrate():
    model, card = tiny_nenni("channel")
    exported = build_onnx(model, card, TINY_SHAPE, ExportOptions())
    for method in ("percentile", "entropy"):
        result = quantize_int8(exported.proto, CALIB, Int8Settings(calib_n=32, calib_method=method))
        assert json.loads(graph.read_metadata(result.proto)["nenni.int8"])["method"] == method
        assert result.counts["nenni_layers_int8"] == 4


@pytest.mark.parametrize(
    "settings, message",
    [
        (Int8Settings(calib_method="kl"), "--calib-method"),
        (Int8Settings(calib_n=0), "--calib-n"),
        (Int8Settings(percentile=10), "--calib-percentile"),
    ],
)
def test_bad_settings(settings, message):
    _, exported, _ = quantized("channel")
    with pytest.raises(NenniError, match=message):
        quantize_int8(exported.proto, CALIB, settings)


def test_bad_calibration_images_and_targets():
    _, exported, result = quantized("channel")
    with pytest.raises(NenniError, match=r"shape \[1, 8, 8\] per image, the model takes \[3, 12, 12\]"):
        check_calibration_images(np.zeros((4, 1, 8, 8), np.float32), exported.proto)
    with pytest.raises(NenniError, match="NaN"):
        check_calibration_images(np.full((4, *TINY_SHAPE), np.nan, np.float32), exported.proto)
    with pytest.raises(NenniError, match="already an int8"):
        quantize_int8(result.proto, CALIB, FAST)
    model, card = tiny_nenni("channel")
    trt = build_onnx(model, card, TINY_SHAPE, ExportOptions(target="tensorrt"))
    with pytest.raises(NenniError, match="--target ort"):
        quantize_int8(trt.proto, CALIB, FAST)
    with pytest.raises(NenniError, match="CPU provider"):
        OrtRunner(check_proto(result.proto), provider="cuda")


def test_tolerances_by_precision():
    assert tolerance_for({}).min_agreement == 99.0 and tolerance_for({}).max_relative_error is None
    int8 = tolerance_for({"nenni.precision": "int8"})
    assert int8 == INT8_TOLERANCE and "int8" in int8.describe() and "15 %" in int8.describe()
    assert tolerance_for({"nenni.precision": "int8"}, 90.0).max_relative_error == INT8_TOLERANCE.max_relative_error


# -- the commands -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A calibrated channel NENNI small_cnn on digits (the data set its directory records)."""
    folder = tmp_path_factory.mktemp("int8")
    weights = folder / "w.safetensors"
    torch.manual_seed(0)
    save_state_dict(create_model("small_cnn"), weights)
    out = folder / "nenni"
    args = ["calibrate", "--arch", "small_cnn", "--weights", weights, "--ratio", "0.5", "--calib-n", "128",
            "--eval-n", "64", "--threads", "1", "--out", out]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, text: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and text in lines[0], result.output


def test_export_check_predict_and_bench_on_int8(digits_model, tmp_path):
    out, js = tmp_path / "m8.onnx", tmp_path / "m8.json"
    result = invoke("export", digits_model, "--int8", "--calib-n", "64", "--check-n", "128", "--out", out,
                    "--json", js, "--threads", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "integer kernels" in result.output and "tolerance (int8" in result.output
    summary = json.loads(js.read_text())
    assert summary["int8"]["counts"]["nenni_layers_int8"] == summary["int8"]["counts"]["nenni_layers"] == 2
    assert "digits" in summary["int8"]["calibration"]["source"]
    check = invoke("check", digits_model, out, "--n", "128", "--threads", "1")
    assert check.exit_code == 0 and "check passed" in check.output and "int8" in check.output
    predict = invoke("predict", out, "--n", "128")
    assert predict.exit_code == 0 and "int8 model" in predict.output
    one_line_error(invoke("predict", out, "--n", "8", "--provider", "cuda"), "CPU provider")
    dense = tmp_path / "d.onnx"
    assert invoke("export", digits_model, "--dense", "--out", dense, "--check-n", "32").exit_code == 0
    bench_json = tmp_path / "bench.json"
    bench = invoke("bench", out, dense, "--baseline", dense, "--batch", "2", "--warmup", "0", "--iterations", "4",
                   "--rounds", "2", "--threads", "1", "--no-progress", "--json", bench_json)  # fmt: skip
    assert bench.exit_code == 0, bench.output
    assert "GBitOPs/img" in bench.output and "% of BitOPs-ideal" in bench.output
    report = json.loads(bench_json.read_text())
    labels = list(report["models"])
    assert labels == ["m8", "d", "baseline"] and report["models"]["m8"]["precision"] == "int8"
    cost = report["models"]["m8"]["cost"]
    assert report["models"]["m8"]["as_run"]["bitops"] == cost["bitops_nenni"]  # int8: W8A8 as counted
    assert report["models"]["d"]["as_run"]["bitops"] == cost["macs_dense"] * 1024  # float32 at 32 x 32 bits
    assert report["models"]["m8"]["as_run"]["macs"] == cost["macs_nenni"]  # MACs do not change with precision
    assert set(report["batches"][0]["speedups"]) == {"m8", "d"}
    assert report["ideals"]["d"]["mac"] == pytest.approx(1.0) and report["ideals"]["d"]["bitops"] == pytest.approx(1.0)


def test_int8_export_bad_input(digits_model, tmp_path):
    out = tmp_path / "bad.onnx"
    one_line_error(invoke("export", digits_model, "--int8", "--target", "tensorrt", "--out", out), "--target ort")
    # calibration images of another shape (a folder data set of 3 x 4 x 4 images)
    folder = tmp_path / "tiny_data"
    folder.mkdir()
    for split in ("train", "test"):
        x = np.random.default_rng(0).integers(0, 255, (16, 4, 4, 3), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", x=x, y=np.arange(16) % 10)
    one_line_error(invoke("export", digits_model, "--int8", "--data", folder, "--no-check", "--out", out),
                   "calibration images have shape [3, 4, 4]")  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob("*.onnx"))


def test_int8_export_of_a_model_that_records_no_data(tmp_path):
    train = nd.load_dataset("digits", "train")
    model = nd.load_model(str(Path(__file__).parent / "zoo" / "dense.py") + ":build", data=train)
    model.data = None  # a directory made without a data set: nothing to calibrate on
    model.save(tmp_path / "dense")
    out = tmp_path / "m.onnx"
    one_line_error(invoke("export", tmp_path / "dense", "--int8", "--out", out), "--data")
    assert not out.exists()
    assert invoke("export", tmp_path / "dense", "--int8", "--data", "digits", "--calib-n", "32", "--check-n", "32",
                  "--out", out).exit_code == 0  # fmt: skip
    assert math.isfinite(out.stat().st_size)


# -- the static-batch grouped lowering --------------------------------------------------------------------------
def test_grouped_lowering_float_and_int8_with_a_static_batch():
    model, card = tiny_nenni("channel")
    skip = build_onnx(model, card, TINY_SHAPE, ExportOptions())
    grouped = build_onnx(model, card, TINY_SHAPE, ExportOptions(channel_lowering="grouped", batch=4))
    dims = grouped.proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 4
    convs = graph.nenni_nodes(grouped.proto, (ops.CONV,))
    assert all(n.overload.endswith("_grouped") and graph.node_attr(n, "batch") == 4 for n in convs)
    np.testing.assert_allclose(run(grouped.proto, X[:4]), run(skip.proto, X[:4]), atol=2e-5, rtol=1e-5)
    report = check_parity(model, check_proto(grouped.proto), X[:10])  # 10 images: batches padded to 4
    assert report.images == 10 and report.agreement == 100.0
    result = quantize_int8(grouped.proto, CALIB, FAST)
    assert result.counts["integer_kernels"]["ConvInteger"] == 3 and result.counts["float_compute_total"] == 0
    assert all(n.overload.endswith("_grouped_int8") for n in graph.nenni_nodes(result.proto, (ops.CONV,)))
    assert check_parity(model, check_proto(result.proto), X[:10]).relative_error < 0.03
    with pytest.raises(NenniError, match="--batch"):
        build_onnx(model, card, TINY_SHAPE, ExportOptions(channel_lowering="grouped"))


def test_eval_replays_adversarial_images_on_the_int8_graph(digits_model, tmp_path):
    out = tmp_path / "m8.onnx"
    assert invoke("export", digits_model, "--int8", "--calib-n", "64", "--check-n", "64", "--out", out).exit_code == 0
    js = tmp_path / "eval.json"
    result = invoke("eval", out, "--source", digits_model, "--n", "8", "--eps", "0.1", "--attack", "pgd",
                    "--steps", "2", "--threads", "1", "--json", js)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())
    assert report["clean_agreement"] is not None and report["attacks"]
