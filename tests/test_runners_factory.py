"""The one runner factory: ONNX paths, loaded models and protos become ONNX Runtime sessions; engines need TensorRT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nenni_deploy.errors import NenniError
from nenni_deploy.runtime import OrtRunner, load_onnx_checked, open_runner


def _identity(path):
    g = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_every_onnx_form_opens_the_same_session(tmp_path):
    path = _identity(tmp_path / "m.onnx")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for model in (path, str(path), load_onnx_checked(path), onnx.load(path)):
        runner = open_runner(model, threads=1)
        assert isinstance(runner, OrtRunner)
        with runner:
            np.testing.assert_array_equal(runner.infer(x)["logits"], x)


def test_an_engine_without_tensorrt_or_file_is_one_line(tmp_path):
    with pytest.raises(NenniError, match="no such TensorRT engine"):
        open_runner(tmp_path / "missing.plan")
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\0")
    with pytest.raises(NenniError, match="provider and thread options do not apply"):
        open_runner(plan, threads=2)


def test_a_bound_call_runs_the_session_on_validated_feeds(tmp_path):
    runner = open_runner(_identity(tmp_path / "m.onnx"), threads=1)
    with pytest.raises(NenniError, match="activate"):
        runner.bound(np.zeros((1, 3), np.float32))
    with runner:
        with pytest.raises(NenniError, match="NaN"):
            runner.bound(np.full((1, 3), np.nan, np.float32))
        call = runner.bound(np.ones((2, 3), np.float32))
        np.testing.assert_array_equal(call()[0], np.ones((2, 3)))
        assert runner.providers_used() == ["CPUExecutionProvider"]
