"""`nenni bench` on tiny exported models: behaviour, report schema, bad input. No timing is asserted here."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from test_export_support import TINY_SHAPE, tiny_nenni

from nenni_deploy.cli import main
from nenni_deploy.errors import NenniError
from nenni_deploy.evaluation.bench import BenchSettings, latency_stats, run_bench, speedup_interval
from nenni_deploy.evaluation.profile import parse_trace, stage_of
from nenni_deploy.exporters.export import ExportOptions, export_to_file

FAST = dict(batches=(1, 3), warmup=0.0, iterations=4, rounds=2, threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    model, card = tiny_nenni("channel")
    nenni, dense = folder / "nenni.onnx", folder / "dense.onnx"
    export_to_file(model, card, TINY_SHAPE, nenni, ExportOptions())
    export_to_file(model, card, TINY_SHAPE, dense, ExportOptions(dense=True))
    return nenni, dense


def test_report_holds_both_models_every_batch_and_the_ideal(models):
    nenni, dense = models
    report = run_bench(nenni, dense, BenchSettings(**FAST), progress=False)
    assert report["schema"] == "nenni-bench" and report["schema_version"] == 2
    assert set(report["models"]) == {"model", "baseline"}
    assert report["models"]["model"]["nenni_layers"] > 0 and report["models"]["baseline"]["dense"]
    assert [b["batch"] for b in report["batches"]] == [1, 3]
    for entry in report["batches"]:
        for label in ("model", "baseline"):
            s = entry["models"][label]
            assert s["n"] == 4 and len(s["round_means_ms"]) == 2
            assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
            assert s["throughput_ips"] == pytest.approx(entry["batch"] / (s["mean_ms"] / 1e3))
        sp = entry["speedup"]
        assert sp["ci_low"] <= sp["speedup"] <= sp["ci_high"] and sp["rounds"] == 2
        assert entry["ideal"]["mac_speedup"] > 0 and entry["ideal"]["bitops_speedup"] > 0
        assert entry["ideal"]["fraction_of_mac_ideal"] == pytest.approx(sp["speedup"] / entry["ideal"]["mac_speedup"])
        assert entry["load"]["wall_seconds"] > 0
    cost = report["models"]["model"]["cost"]
    assert report["ideal"]["mac"] == pytest.approx(cost["macs_dense"] / cost["macs_nenni"])
    env = report["environment"]
    assert env["versions"]["onnxruntime"] and env["intra_op_threads"] == 1 and env["logical_cores"] >= 1
    assert len(report["models"]["model"]["sha256"]) == 64
    json.dumps(report)  # JSON-ready as it is


def test_single_model_has_no_speedup(models):
    report = run_bench(models[1], None, BenchSettings(**{**FAST, "batches": (2,)}), progress=False)
    assert list(report["models"]) == ["model"] and "speedup" not in report["batches"][0]


def test_profile_splits_time_into_nenni_stages(models):
    settings = BenchSettings(**{**FAST, "batches": (2,)}, profile=True, profile_iterations=2)
    report = run_bench(models[0], models[1], settings, progress=False)
    nenni = report["profile"]["model"]["2"]
    assert {"project", "approximate", "select", "exact", "fill"} <= set(nenni["stage_ms"])
    assert sum(nenni["stage_share"].values()) == pytest.approx(1.0)
    assert set(report["profile"]["baseline"]["2"]["stage_ms"]) == {"rest"}


def test_stage_names_survive_inlining_and_nchwc_renaming():
    assert stage_of("_inlfunc_NenniConv_token_3_exact.Gather_166") == "exact"
    assert stage_of("_inlfunc_NenniConv_project.conv_1_nchwc") == "project"
    assert stage_of("/layer1/conv/Conv") == "rest"
    events = [
        {"cat": "Node", "name": "a_select.TopK_1_kernel_time", "dur": 30, "args": {"op_name": "TopK"}},
        {"cat": "Node", "name": "conv_kernel_time", "dur": 10, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_fence_before", "dur": 99, "args": {}},
    ]
    summary = parse_trace(events, runs=2)
    assert summary["stage_ms"] == {"select": 0.015, "rest": 0.005} and summary["kernels_per_run"] == 1


def test_statistics():
    s = latency_stats([0.001, 0.002, 0.003, 0.004], batch=8)
    assert s["mean_ms"] == pytest.approx(2.5) and s["min_ms"] == pytest.approx(1.0)
    assert s["throughput_ips"] == pytest.approx(8 / 0.0025)
    sp = speedup_interval([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert sp["speedup"] == pytest.approx(2.0) and sp["ci_low"] == pytest.approx(2.0)
    noisy = speedup_interval([2.0, 3.0, 2.5, 2.2], [1.0, 1.0, 1.0, 1.0])
    assert noisy["ci_low"] < noisy["speedup"] < noisy["ci_high"]


def test_cli_writes_json_and_plot(models, tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    args = [
        str(models[0]),
        "--baseline",
        str(models[1]),
        "--batch",
        "2",
        "--iterations",
        "4",
        "--rounds",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--json",
        str(out),
        "--plot",
        str(png),
        "--no-progress",
    ]
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 0, result.output
    assert "speedup" in result.output and "MAC-ideal" in result.output
    report = json.loads(out.read_text())
    assert report["batches"][0]["batch"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.png"]  # no temporary files left


def _cli(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_bad_input_gives_one_line_errors(models, tmp_path):
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not a model")
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not an engine either")  # refused for want of TensorRT here; by TensorRT on a GPU machine
    cases = [
        ((tmp_path / "missing.onnx",), "missing.onnx"),
        ((foreign,), "foreign.onnx"),
        ((models[0], "--iterations", 3, "--rounds", 5), "--iterations"),
        ((models[0], "--iterations", 4, "--duration", 1), "not both"),
        ((tmp_path / "model.plan",), "TensorRT"),
        ((plan,), "tensorrt"),
    ]
    for args, words in cases:
        result = _cli(*args)
        assert result.exit_code != 0
        assert "Traceback" not in result.output and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_fixed_batch_model_refuses_another_batch(models, tmp_path):
    proto = onnx.load(models[1])
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, fixed)
    with pytest.raises(NenniError, match="fixed at 4"):
        run_bench(fixed, None, BenchSettings(**{**FAST, "batches": (2,)}), progress=False)
    report = run_bench(fixed, None, BenchSettings(**{**FAST, "batches": (4,)}), progress=False)
    assert report["batches"][0]["models"]["model"]["n"] == 4
    # beside a dynamic-batch baseline at its own batch size (the pairing compares one image's shape)
    report = run_bench(fixed, models[1], BenchSettings(**{**FAST, "batches": (4,)}), progress=False, force=True)
    assert report["batches"][0]["models"]["baseline"]["n"] == 4


@pytest.mark.parametrize("bad", [dict(rounds=1), dict(batches=()), dict(warmup=float("nan")), dict(iterations=0)])
def test_settings_out_of_range(bad):
    with pytest.raises(NenniError):
        BenchSettings(**{**FAST, **bad}).validate()


def test_inputs_are_seeded(models):
    a = run_bench(models[1], None, BenchSettings(**{**FAST, "batches": (1,)}), progress=False)
    assert a["settings"]["seed"] == 0 and np.isfinite(a["batches"][0]["models"]["model"]["mean_ms"])


def test_a_baseline_must_be_the_candidates_dense_base(tmp_path):
    """Shapes and the dense-base hash that exports record: an unrelated model is refused unless --force."""
    from test_export_support import DIGITS_SHAPE, small_cnn_nenni

    model, card = tiny_nenni("channel")
    mine = {**card, "base_weights_sha256": "a" * 64}
    other = {**card, "base_weights_sha256": "b" * 64}
    nenni, same, foreign = tmp_path / "n.onnx", tmp_path / "d.onnx", tmp_path / "x.onnx"
    export_to_file(model, mine, TINY_SHAPE, nenni, ExportOptions())
    export_to_file(model, mine, TINY_SHAPE, same, ExportOptions(dense=True))
    export_to_file(model, other, TINY_SHAPE, foreign, ExportOptions(dense=True))
    settings = BenchSettings(**{**FAST, "batches": (1,)})
    assert run_bench(nenni, same, settings, progress=False)["pairing"]["verified"]
    with pytest.raises(NenniError, match="dense-base hashes differ"):
        run_bench(nenni, foreign, settings, progress=False)
    assert run_bench(nenni, foreign, settings, progress=False, force=True)["pairing"]["forced"]
    digits_model, digits_card = small_cnn_nenni()[:2]
    wrong_shape = tmp_path / "digits.onnx"
    export_to_file(digits_model, digits_card, DIGITS_SHAPE, wrong_shape, ExportOptions(dense=True))
    args = ["bench", str(nenni), "--baseline", str(wrong_shape), "--iterations", "2", "--rounds", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "inputs differ (3x12x12 vs 1x8x8)" in result.output, result.output
