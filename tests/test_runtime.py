"""Runners, checked loading, the bad-input catalogue and the export / predict / check commands."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_export_support import DIGITS_SHAPE, small_cnn_nenni

from nenni_deploy.cli import main
from nenni_deploy.data import load_dataset
from nenni_deploy.errors import NenniError
from nenni_deploy.exporters import graph, ops
from nenni_deploy.nenni.config import LayerSpec, NenniConfig
from nenni_deploy.nenni.io import load_model_dir, save_model_dir
from nenni_deploy.runtime import (
    OrtRunner,
    RuntimeFallbackWarning,
    TorchRunner,
    accuracy,
    check_proto,
    load_onnx_checked,
    predict_dataset,
)

DIGITS = load_dataset("digits", "test")


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("Error:") and len(text.splitlines()) == 1, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def model_dir(workdir):
    model, _, config, specs = small_cnn_nenni("channel", "gaussian")
    return save_model_dir(workdir / "nenni", model, source="small_cnn", config=config, specs=specs)


@pytest.fixture(scope="module")
def onnx_path(workdir, model_dir):
    out = workdir / "model.onnx"
    result = cli("export", model_dir, "--out", out, "--check-n", 64, "--json", workdir / "export.json")
    assert result.exit_code == 0, result.output
    assert "top-1 agreement 100.00 %" in result.output and "wrote" in result.output
    return out


def test_export_command_reports_and_records(workdir, onnx_path):
    summary = json.loads((workdir / "export.json").read_text())
    assert summary["stats"]["nenni_layers"] == 2 and summary["stats"]["nenni_noise"] == 2
    assert summary["parity"]["agreement"] == 100.0 and summary["parity"]["noise"]["seeded_equal"]
    assert summary["bytes"] == onnx_path.stat().st_size and summary["seconds"] > 0
    loaded = load_onnx_checked(onnx_path)
    assert loaded.is_nenni and loaded.noise_nodes == 2 and loaded.target == "ort" and not loaded.seeded
    assert loaded.metadata["nenni.arch"] == "small_cnn"


def test_predict_command_matches_pytorch_accuracy(workdir, onnx_path, model_dir):
    result = cli("predict", onnx_path, "--threads", 1, "--batch-size", 100, "--json", workdir / "p.json")
    assert result.exit_code == 0, result.output
    record = json.loads((workdir / "p.json").read_text())
    assert record["data"] == "digits" and record["images"] == len(DIGITS)
    assert record["provider_used"] == "CPUExecutionProvider"
    assert f"{record['accuracy']:.2f} %" in result.output


def test_check_command_passes_and_reports_noise(workdir, model_dir, onnx_path):
    result = cli("check", model_dir, onnx_path, "--n", 128, "--json", workdir / "c.json")
    assert result.exit_code == 0, result.output
    record = json.loads((workdir / "c.json").read_text())
    assert record["passed"] and record["weights_match"] and record["agreement"] == 100.0
    assert record["accuracy_torch"] == record["accuracy_onnx"]
    assert record["noise"]["unseeded_runs_differ"] and record["noise"]["seeded_equal"]
    assert "check passed" in result.output


def test_runners_agree_and_batching_does_not_matter(model_dir, onnx_path):
    from nenni_deploy.runtime.parity import runnable_proto, torch_reference

    model, _ = load_model_dir(model_dir)
    loaded = load_onnx_checked(onnx_path)
    deterministic = check_proto(graph.without_noise(runnable_proto(loaded)))
    x = DIGITS.x[:50]
    with (
        OrtRunner(deterministic, threads=1) as ort_runner,
        TorchRunner(torch_reference(model, dense=False, noise=False), DIGITS_SHAPE) as torch_runner,
    ):
        whole = predict_dataset(ort_runner, x, batch_size=50)
        pieces = predict_dataset(ort_runner, x, batch_size=7)
        reference = predict_dataset(torch_runner, x, batch_size=13)
    np.testing.assert_allclose(whole, pieces, atol=1e-6)
    np.testing.assert_allclose(whole, reference, atol=1e-5)
    assert accuracy(whole, DIGITS.y[:50]) == accuracy(reference, DIGITS.y[:50])


# -- bad input ---------------------------------------------------------------------------------------------------
def test_corrupt_truncated_and_empty_files(tmp_path, onnx_path):
    data = onnx_path.read_bytes()
    cases = {
        "garbage.onnx": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "empty.onnx": b"",
        "text.onnx": b"this is not a model\n",
    }
    for fraction in (0.1, 0.5, 0.9, 0.999):
        cases[f"trunc{fraction}.onnx"] = data[: int(len(data) * fraction)]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NenniError) as info:
            load_onnx_checked(tmp_path / name)
        message = str(info.value)
        assert any(w in message for w in ("corrupt", "truncated", "empty", "not a valid")), (name, message)
        assert_one_line_error(cli("predict", tmp_path / name, "--data", "digits"))
    with pytest.raises(NenniError, match="no such file"):
        load_onnx_checked(tmp_path / "missing.onnx")


def _edited(onnx_path, tmp_path, name, edit):
    proto = onnx.load(onnx_path)
    edit(proto)
    out = tmp_path / name
    onnx.save_model(proto, out)
    return out


def test_unknown_domain_version_missing_body_and_unknown_op(tmp_path, onnx_path):
    def bump(p):
        next(o for o in p.opset_import if o.domain == ops.DOMAIN).version = 2

    path = _edited(onnx_path, tmp_path, "v2.onnx", bump)
    with pytest.raises(NenniError, match="ai.nenni version 2"):
        load_onnx_checked(path)
    assert_one_line_error(cli("predict", path), "version 2")

    path = _edited(onnx_path, tmp_path, "nobody.onnx", lambda p: p.ClearField("functions"))
    with pytest.raises(NenniError, match="no function body"):
        load_onnx_checked(path)
    assert_one_line_error(cli("predict", path), "no function body")

    def rename(p):
        graph.nenni_nodes(p)[0].op_type = "NenniPool"

    with pytest.raises(NenniError, match="unknown ai.nenni op"):
        load_onnx_checked(_edited(onnx_path, tmp_path, "op.onnx", rename))


def test_tensorrt_target_refused_by_onnx_runtime(tmp_path, onnx_path):
    path = _edited(onnx_path, tmp_path, "trt.onnx", graph.mark_plugins)
    assert_one_line_error(cli("predict", path), "TensorRT-target", "--target ort")
    assert load_onnx_checked(path, require_functions=False).is_nenni


def test_external_data_must_stay_in_the_model_folder(tmp_path, onnx_path):
    proto = onnx.load(onnx_path)
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save_model(proto, inner / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert load_onnx_checked(inner / "m.onnx").is_nenni

    def relocate(location):
        edited = onnx.load(inner / "m.onnx", load_external_data=False)
        for tensor in edited.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(edited, inner / "evil.onnx")
        return inner / "evil.onnx"

    (tmp_path / "outside.data").write_bytes((inner / "m.onnx.data").read_bytes())
    with pytest.raises(NenniError, match="outside the model's folder"):
        load_onnx_checked(relocate("../outside.data"))
    assert_one_line_error(cli("predict", inner / "evil.onnx"), "outside")
    with pytest.raises(NenniError, match="must be relative"):
        load_onnx_checked(relocate(str(tmp_path / "outside.data")))
    with pytest.raises(NenniError, match="missing"):
        load_onnx_checked(relocate("nothere.data"))
    (inner / "short.data").write_bytes(b"\0" * 10)
    with pytest.raises(NenniError, match="truncated"):
        load_onnx_checked(relocate("short.data"))


def _plain_model() -> onnx.ModelProto:
    """A dense classifier from elsewhere: no NENNI ops, no metadata."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(10, 64)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], ["out"], transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "plain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 10])],
        initializer=[w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_model_from_elsewhere_runs_as_dense(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save_model(_plain_model(), path)
    loaded = load_onnx_checked(path)
    assert not loaded.is_nenni and loaded.target == "ort"
    result = cli("predict", path, "--data", "digits", "--n", 20)
    assert result.exit_code == 0, result.output
    assert "dense model" in result.output
    assert_one_line_error(cli("predict", path), "--data")  # nothing records which data set it is for


def test_wrong_inputs_are_refused_with_a_reason(onnx_path):
    loaded = load_onnx_checked(onnx_path)
    good = DIGITS.x[:4].numpy()
    with OrtRunner(loaded, threads=1) as runner:
        assert runner.infer(good)["logits"].shape == (4, 10)
        with pytest.raises(NenniError, match="float32"):
            runner.infer(good.astype(np.float64))
        with pytest.raises(NenniError, match=r"shape \[batch, 1, 8, 8\]"):
            runner.infer(np.zeros((4, 3, 8, 8), np.float32))
        with pytest.raises(NenniError, match="shape"):
            runner.infer(np.zeros((4, 64), np.float32))
        with pytest.raises(NenniError, match="missing input"):
            runner.infer({"pixels": good})
        for bad, text in ((np.nan, "1 NaN and 0 Inf"), (np.inf, "0 NaN and 1 Inf")):
            x = good.copy()
            x[0, 0, 0, 0] = bad
            with pytest.raises(NenniError, match=text):
                runner.infer(x)
    with pytest.raises(NenniError, match="activate"):
        OrtRunner(loaded).infer(good)
    with pytest.raises(NenniError, match="provider"):
        OrtRunner(loaded, provider="vulkan")


def test_cifar_data_on_a_digits_model_is_a_clear_error(tmp_path, onnx_path):
    x = np.zeros((2, 3, 32, 32), np.float32)
    with OrtRunner(load_onnx_checked(onnx_path)) as runner, pytest.raises(NenniError, match="dimension 1 is 3"):
        predict_dataset(runner, x)


def test_provider_fallback_warns(onnx_path):
    loaded = load_onnx_checked(onnx_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with OrtRunner(loaded, provider="cuda") as runner:
            runner.infer(DIGITS.x[:2].numpy())
            assert runner.session.get_providers()[0] == "CPUExecutionProvider"
    assert runner.warnings and "CUDAExecutionProvider" in runner.warnings[0]
    assert any(issubclass(w.category, RuntimeFallbackWarning) for w in caught)
    result = cli("predict", onnx_path, "--provider", "tensorrt", "--n", 10)
    assert result.exit_code == 0 and "warning: TensorrtExecutionProvider" in result.output


def test_export_to_an_unwritable_place_fails_cleanly(tmp_path, model_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = cli("export", model_dir, "--out", blocker / "m.onnx", "--no-check")  # works even as root
    assert_one_line_error(result, "cannot write")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not _writable(locked):  # root writes anywhere
            result = cli("export", model_dir, "--out", locked / "m.onnx", "--no-check")
            assert_one_line_error(result, "cannot write")
            assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
    result = cli("export", model_dir, "--out", tmp_path, "--no-check")  # a directory
    assert result.exit_code != 0
    assert_one_line_error(cli("export", tmp_path / "nothere", "--out", tmp_path / "x.onnx"), "not a model directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "locked"]


def _writable(folder) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_check_command_fails_on_a_mismatched_model(tmp_path, model_dir, onnx_path):
    model, card = load_model_dir(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    other = save_model_dir(
        tmp_path / "other",
        model,
        source="small_cnn",
        config=NenniConfig.from_dict(card["nenni"]),
        specs=[LayerSpec.from_dict(s) for s in card["layers"]],
    )
    result = cli("check", other, onnx_path, "--n", 64, "--min-agreement", 100)
    assert "exported from other weights" in result.output
    assert result.exit_code == 1 and "check failed" in result.output
