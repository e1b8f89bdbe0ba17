"""The static TensorRT checker: every `--target tensorrt` export passes it; shadowing functions, unsupported
ops, TopK with K >= 3840 and mismatched plugins fail with a message naming the node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_export_support import TINY_SHAPE, tiny_nenni

from nenni_deploy.errors import NenniError
from nenni_deploy.exporters import graph, ops, tensorrt_check
from nenni_deploy.exporters.export import ExportOptions, build_onnx

_CACHE: dict = {}


def trt_export(granularity: str, noise: str = "none", **options) -> onnx.ModelProto:
    key = (granularity, noise, tuple(sorted(options.items())))
    if key not in _CACHE:
        model, card = tiny_nenni(granularity, noise)
        _CACHE[key] = build_onnx(model, card, TINY_SHAPE, ExportOptions(target="tensorrt", **options)).proto
    copy = onnx.ModelProto()
    copy.CopyFrom(_CACHE[key])
    return copy


@pytest.mark.parametrize("noise", ["none", "gaussian"])
@pytest.mark.parametrize("granularity", ops.GRANULARITIES)
def test_every_tensorrt_export_passes(granularity, noise):
    proto = trt_export(granularity, noise)
    assert tensorrt_check.tensorrt_problems(proto) == []
    nodes = graph.nenni_nodes(proto)
    assert len(nodes) == (8 if noise == "gaussian" else 4)
    for node in nodes:  # each resolves to the plugin the runtime registers, by (op type, namespace, version)
        spec = tensorrt_check.plugin_for(node)
        assert spec is ops.PLUGIN_SPECS[node.op_type]
        assert spec.plugin_id == f"nenni::{node.op_type}"


def test_seeded_and_unseeded_noise_nodes_carry_a_seed_for_the_plugin():
    unseeded = graph.nenni_nodes(trt_export("channel", "gaussian"), (ops.NOISE,))
    assert {next(a.f for a in n.attribute if a.name == "seed") for n in unseeded} == {ops.UNSEEDED}
    seeded = graph.nenni_nodes(trt_export("channel", "gaussian", noise_seed=7), (ops.NOISE,))
    assert all(next(a.f for a in n.attribute if a.name == "seed") >= 0 for n in seeded)
    ort_form = graph.to_ort_form(trt_export("channel", "gaussian"))  # ORT seeds itself: the marker goes
    assert not any(a.name == "seed" for n in graph.nenni_nodes(ort_form, (ops.NOISE,)) for a in n.attribute)


def test_shadowing_local_function_fails_naming_the_node():
    proto = trt_export("channel")
    node = graph.nenni_nodes(proto, (ops.CONV,))[0]
    proto.functions.append(ops.function_for_node(node, graph.model_opset(proto)))
    with pytest.raises(NenniError, match=rf"{node.name} \(NenniConv\): a model-local function .* shadows the plugin"):
        tensorrt_check.check_tensorrt_graph(proto)


def test_unsupported_op_fails_naming_the_node():
    proto = trt_export("nm")
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type, relu.name = "BitShift", "the_shift"
    with pytest.raises(NenniError, match=r"1 node problem.*the_shift \(BitShift\): not supported"):
        tensorrt_check.check_tensorrt_graph(proto)


def _topk_model(k: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("v", TensorProto.FLOAT), ("i", TensorProto.INT64))]
    k_init = numpy_helper.from_array(np.array([k], dtype=np.int64), "k")
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top_scores", axis=1)
    return helper.make_model(helper.make_graph([node], "g", [x], outs, [k_init]))


def test_topk_limit():
    assert tensorrt_check.tensorrt_problems(_topk_model(3839)) == []
    with pytest.raises(NenniError, match=r"top_scores \(TopK\): TopK with K = 3840: TensorRT needs K < 3840"):
        tensorrt_check.check_tensorrt_graph(_topk_model(3840))
    dynamic = _topk_model(10)
    dynamic.graph.initializer.pop()
    dynamic.graph.input.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    assert "must be a constant" in tensorrt_check.tensorrt_problems(dynamic)[0].message


def test_plugin_mismatches_are_named():
    proto = trt_export("element", "gaussian")
    conv, noise = graph.nenni_nodes(proto, (ops.CONV,))[0], graph.nenni_nodes(proto, (ops.NOISE,))[0]
    for a in conv.attribute:
        if a.name == "plugin_version":
            a.s = b"2"
    graph._remove_attrs(noise, ("seed",))
    problems = {p.node: p.message for p in tensorrt_check.tensorrt_problems(proto)}
    assert "no plugin nenni::NenniConv version 2" in problems[conv.name]
    assert "missing attribute 'seed'" in problems[noise.name]
    ort_form = graph.to_ort_form(trt_export("element"))  # ORT form: no plugin attributes, bodies attached
    messages = [p.message for p in tensorrt_check.tensorrt_problems(ort_form)]
    assert len(messages) == 4 and all("shadows the plugin" in m for m in messages)


def test_custom_domain_op_with_a_builtin_name_is_refused():
    proto = trt_export("threshold")
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.domain = ops.DOMAIN
    assert "shadows TensorRT's built-in op" in tensorrt_check.tensorrt_problems(proto)[0].message


def test_the_mask_may_only_feed_the_noise_plugin():
    proto = trt_export("channel", "gaussian")
    conv = graph.nenni_nodes(proto, (ops.CONV,))[0]
    proto.graph.output.append(helper.make_tensor_value_info(conv.output[1], TensorProto.BOOL, None))
    problems = tensorrt_check.tensorrt_problems(proto)
    assert len(problems) == 1 and problems[0].node == conv.name
    assert "read by the graph output; only NenniNoise may read it" in problems[0].message
