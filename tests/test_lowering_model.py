"""The channel lowering model (exporters/lowering_model.py) and `--channel-lowering auto` / `tune` on exports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_export_support import TINY_SHAPE, run, tiny_nenni

from nenni_deploy.errors import NenniError
from nenni_deploy.exporters import graph, lowering_model, ops
from nenni_deploy.exporters.export import ExportOptions, build_onnx
from nenni_deploy.exporters.lowering_model import Layer, fit_lowering_model, load_lowering_model

X = torch.rand(8, *TINY_SHAPE, generator=torch.Generator().manual_seed(1))
WIDTHS = (16, 32, 64, 128, 256, 512)
SIDES = (4, 8, 16, 32)


def synthetic_rows(grouped: bool = False, scale: float = 1.0):
    """skip beats masked above width 100 (float32) or 50 (int8) at 8x8 and ratio 0.25, at twice the width at
    ratio 0.75; wider still at batch 64; more positions help a little. With `grouped`, grouped is 10 % faster.
    `scale` moves every crossover width."""
    rows = []
    for precision, cross in (("float32", 100.0 * scale), ("int8", 50.0 * scale)):
        for batch, shift in ((1, 1.0), (64, 1.5)):
            for ratio, factor in ((0.25, 1.0), (0.75, 2.0)):
                for width in WIDTHS:
                    for side in SIDES:
                        log_ratio = -0.5 * (math.log(width) - math.log(cross * factor * shift))
                        log_ratio -= 0.1 * (math.log(side * side) - math.log(64))
                        base = {"precision": precision, "batch": batch, "ratio": ratio, "cin": width, "cout": width,
                                "positions": side * side, "masked_ms": 1.0}  # fmt: skip
                        rows.append({**base, "variant": "skip", "ms": math.exp(log_ratio)})
                        if grouped:
                            rows.append({**base, "variant": "grouped", "ms": 0.9 * math.exp(log_ratio)})
    return rows


def test_fit_recovers_the_model_and_decides_by_it():
    model = fit_lowering_model(synthetic_rows(), {"machine": "test"})
    fit = next(f for f in model.fits if (f.variant, f.precision, f.batch, f.ratio) == ("skip", "float32", 1, 0.25))
    assert fit.b == pytest.approx(-0.5) and fit.c == pytest.approx(-0.1) and fit.misclassified == 0
    assert fit.crossover_width(64) == pytest.approx(100.0) and fit.points == len(WIDTHS) * len(SIDES)
    at8 = lambda w: Layer(w, w, 64)  # noqa: E731
    assert (
        model.choose("float32", 1, 0.25, at8(120)) == "skip" and model.choose("float32", 1, 0.25, at8(80)) == "masked"
    )
    assert model.choose("int8", 1, 0.25, at8(60)) == "skip" and model.choose("float32", 1, 0.25, at8(60)) == "masked"
    # the same MACs (C^2 H W) decide differently by width: wide and small beats narrow and large
    assert model.choose("float32", 1, 0.25, Layer(128, 128, 64)) == "skip"
    assert model.choose("float32", 1, 0.25, Layer(64, 64, 256)) == "masked"
    # ratios in between are interpolated on the log-ratio scale, outside they take the nearest
    assert model.choose("float32", 1, 0.5, at8(130)) == "masked" and model.choose("float32", 1, 0.5, at8(160)) == "skip"
    assert (
        model.choose("float32", 1, 0.9, at8(190)) == "masked" and model.choose("float32", 1, 0.05, at8(110)) == "skip"
    )
    # batch sizes go to the nearest measured one on a log scale
    assert (
        model.choose("float32", 48, 0.25, at8(120)) == "masked" and model.choose("float32", 4, 0.25, at8(120)) == "skip"
    )
    with pytest.raises(NenniError, match="float16"):
        model.choose("float16", 1, 0.5, at8(100))
    # grouped is a candidate only where asked for (static-batch exports), and only once measured
    assert model.choose("float32", 1, 0.25, at8(120), ("skip", "grouped")) == "skip"
    both = fit_lowering_model(synthetic_rows(grouped=True))
    assert both.choose("float32", 1, 0.25, at8(120), ("skip", "grouped")) == "grouped"
    assert both.choose("float32", 1, 0.25, at8(120)) == "skip"
    assert both.choose("float32", 1, 0.25, at8(40), ("skip", "grouped")) == "masked"


def test_model_round_trips_and_the_packaged_one_loads(tmp_path):
    model = fit_lowering_model(synthetic_rows(grouped=True))
    model.save(tmp_path / "m.json")
    again = load_lowering_model(tmp_path / "m.json")
    assert again.fits == model.fits
    packaged = load_lowering_model()
    assert {f.precision for f in packaged.fits} == {"float32", "int8"} and packaged.variants() == {"skip", "grouped"}
    assert {f.batch for f in packaged.fits} >= {1, 64} and packaged.measured.get("command")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(NenniError, match="not a channel lowering model"):
        load_lowering_model(tmp_path / "bad.json")
    with pytest.raises(NenniError, match="crossover.py"):
        load_lowering_model(tmp_path / "missing.json")


@pytest.mark.parametrize("precision, batch", [("float32", 1), ("int8", 64)])
def test_auto_export_follows_the_model(tmp_path, monkeypatch, precision, batch):
    path = tmp_path / "model.json"
    # crossovers among the tiny net's widths: at ratio 0.5, 12x12 and width 16 masked, 6x6 and width 22.6 skip
    fit_lowering_model(synthetic_rows(scale=0.138), {"command": "test"}).save(path)
    monkeypatch.setattr(lowering_model, "MODEL_FILE", path)
    model, card = tiny_nenni("channel")
    options = ExportOptions(channel_lowering="auto", tune_batch=batch, precision=precision)
    result = build_onnx(model, card, TINY_SHAPE, options)
    meta = graph.read_metadata(result.proto)
    chosen = json.loads(meta["nenni.lowering"])
    overloads = json.loads(meta["nenni.overloads"])
    convs = [n.name for n in graph.nenni_nodes(result.proto, (ops.CONV,))]
    assert [layer["layer"] for layer in chosen["layers"]] == convs and chosen["batch"] == batch
    decided = load_lowering_model(path)
    for layer in chosen["layers"]:
        features = Layer(layer["c_in"], layer["c_out"], layer["positions"])
        assert features.width == pytest.approx(layer["width"])
        expect = decided.choose(precision, batch, layer["ratio"], features)
        assert layer["choice"] == expect and overloads[layer["layer"]].endswith("_masked") == (expect == "masked")
    block = next(layer for layer in chosen["layers"] if layer["layer"] == "block.conv1")
    assert block["width"] == 16 and block["positions"] == 12 * 12 and block["ratio"] == 0.5
    down = next(layer for layer in chosen["layers"] if layer["layer"] == "down")
    assert down["width"] == pytest.approx(math.sqrt(16 * 32)) and down["positions"] == 6 * 6  # stride 2
    if (precision, batch) == ("float32", 1):  # the narrow 12x12 block layers masked, the wider 6x6 one skips
        assert {layer["layer"]: layer["choice"] for layer in chosen["layers"]} == {
            "block.conv1": "masked", "block.conv2": "masked", "down": "skip"}  # fmt: skip
    skip = build_onnx(model, card, TINY_SHAPE, ExportOptions())
    np.testing.assert_allclose(run(result.proto, X), run(skip.proto, X), atol=2e-5, rtol=1e-5)


def test_auto_with_a_static_batch_can_choose_grouped(tmp_path, monkeypatch):
    path = tmp_path / "model.json"
    fit_lowering_model(synthetic_rows(grouped=True, scale=0.2), {"command": "test"}).save(path)
    monkeypatch.setattr(lowering_model, "MODEL_FILE", path)
    model, card = tiny_nenni("channel")
    options = ExportOptions(channel_lowering="auto", batch=2, precision="int8")
    result = build_onnx(model, card, TINY_SHAPE, options)
    chosen = json.loads(graph.read_metadata(result.proto)["nenni.lowering"])
    assert chosen["batch"] == 2 and {layer["choice"] for layer in chosen["layers"]} <= {"grouped", "masked"}
    overloads = {n.name: n.overload for n in graph.nenni_nodes(result.proto, (ops.CONV,))}
    for layer in chosen["layers"]:
        assert overloads[layer["layer"]].endswith(f"_{layer['choice']}")
