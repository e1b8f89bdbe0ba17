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
from nenni_deploy.exporters.lowering_model import fit_lowering_model, load_lowering_model

X = torch.rand(8, *TINY_SHAPE, generator=torch.Generator().manual_seed(1))


def synthetic_rows(grouped: bool = False):
    """skip beats masked above work 1e6 (float32) or 1e5 (int8) at ratio 0.25, ten times later at ratio 0.75;
    batch 64 like batch 1 but twice as far. With `grouped`, the grouped body is 10 % faster than skip."""
    rows = []
    for precision, cross in (("float32", 1e6), ("int8", 1e5)):
        for batch, shift in ((1, 1.0), (64, 2.0)):
            for ratio, factor in ((0.25, 1.0), (0.75, 10.0)):
                for work in np.geomspace(1e3, 1e9, 13):
                    log_ratio = -0.2 * (math.log(work) - math.log(cross * factor * shift))
                    base = {
                        "precision": precision,
                        "batch": batch,
                        "ratio": ratio,
                        "work": float(work),
                        "masked_ms": 1.0,
                    }
                    rows.append({**base, "variant": "skip", "ms": math.exp(log_ratio)})
                    if grouped:
                        rows.append({**base, "variant": "grouped", "ms": 0.9 * math.exp(log_ratio)})
    return rows


def test_fit_recovers_the_crossover_and_decides_by_it():
    model = fit_lowering_model(synthetic_rows(), {"machine": "test"})
    fit = next(f for f in model.fits if (f.variant, f.precision, f.batch, f.ratio) == ("skip", "float32", 1, 0.25))
    assert fit.crossover_work == pytest.approx(1e6, rel=1e-6) and fit.misclassified == 0 and fit.points == 13
    assert model.choose("float32", 1, 0.25, 2e6) == "skip" and model.choose("float32", 1, 0.25, 5e5) == "masked"
    assert model.choose("int8", 1, 0.25, 2e5) == "skip" and model.choose("float32", 1, 0.25, 2e5) == "masked"
    # ratios in between are interpolated on the log-ratio scale, outside they take the nearest
    assert model.choose("float32", 1, 0.5, 2e6) == "masked" and model.choose("float32", 1, 0.5, 4e6) == "skip"
    assert model.choose("float32", 1, 0.9, 5e6) == "masked" and model.choose("float32", 1, 0.05, 1.5e6) == "skip"
    # batch sizes go to the nearest measured one on a log scale
    assert model.choose("float32", 48, 0.25, 1.5e6) == "masked" and model.choose("float32", 4, 0.25, 1.5e6) == "skip"
    with pytest.raises(NenniError, match="float16"):
        model.choose("float16", 1, 0.5, 1e6)
    # grouped is a candidate only where asked for (static-batch exports), and only once measured
    assert model.choose("float32", 1, 0.25, 2e6, ("skip", "grouped")) == "skip"
    both = fit_lowering_model(synthetic_rows(grouped=True))
    assert both.choose("float32", 1, 0.25, 2e6, ("skip", "grouped")) == "grouped"
    assert both.choose("float32", 1, 0.25, 2e6) == "skip"
    assert both.choose("float32", 1, 0.25, 1e5, ("skip", "grouped")) == "masked"


def test_model_round_trips_and_the_packaged_one_loads(tmp_path):
    model = fit_lowering_model(synthetic_rows())
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
    fit_lowering_model(synthetic_rows(), {"command": "test"}).save(path)
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
        expect = decided.choose(precision, batch, layer["ratio"], layer["work"], ("skip",))
        assert layer["choice"] == expect and overloads[layer["layer"]].endswith("_masked") == (expect == "masked")
    block = next(layer for layer in chosen["layers"] if layer["layer"] == "block.conv1")
    assert block["work"] == 16 * 16 * 12 * 12 and block["ratio"] == 0.5  # C_in * C_out * H * W; K / C_out
    skip = build_onnx(model, card, TINY_SHAPE, ExportOptions())
    np.testing.assert_allclose(run(result.proto, X), run(skip.proto, X), atol=2e-5, rtol=1e-5)


def test_auto_with_a_static_batch_can_choose_grouped(tmp_path, monkeypatch):
    path = tmp_path / "model.json"
    fit_lowering_model(synthetic_rows(grouped=True), {"command": "test"}).save(path)
    monkeypatch.setattr(lowering_model, "MODEL_FILE", path)
    model, card = tiny_nenni("channel")
    options = ExportOptions(channel_lowering="auto", batch=2, precision="int8")  # int8 crosses at work 1e5
    result = build_onnx(model, card, TINY_SHAPE, options)
    chosen = json.loads(graph.read_metadata(result.proto)["nenni.lowering"])
    assert chosen["batch"] == 2 and {layer["choice"] for layer in chosen["layers"]} <= {"grouped", "masked"}
    overloads = {n.name: n.overload for n in graph.nenni_nodes(result.proto, (ops.CONV,))}
    for layer in chosen["layers"]:
        assert overloads[layer["layer"]].endswith(f"_{layer['choice']}")
