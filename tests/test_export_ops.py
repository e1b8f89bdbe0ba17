"""The ai.nenni ops on their own: schemas, shape inference, every function body against the PyTorch layer, noise."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_export_support import session

from nenni_deploy.exporters import ops
from nenni_deploy.nenni.config import LayerSpec
from nenni_deploy.nenni.layers import NenniLayer, ScaledConv2d, ScaledLinear
from nenni_deploy.nenni.selection import select

OPSET = 18


def make_layer(kind, granularity, rank, *, cin=6, n=16, k=4, kernel=3, stride=1, pad=1, dilation=1, seed=0):
    torch.manual_seed(seed)
    if kind == "conv":
        exact = ScaledConv2d(cin, n, kernel, stride=stride, padding=pad, dilation=dilation)
        d = cin * kernel * kernel
    else:
        exact = ScaledLinear(cin, n)
        d = cin
    with torch.no_grad():
        exact.scale.uniform_(0.5, 2.0)
    nm = (2, 4) if granularity == "nm" else None
    spec = LayerSpec("layer", kind, d, n, k, 0.25, granularity, nm, rank, "none", 1.0, 3, 8, threshold=0.1)
    layer = NenniLayer(exact, spec)
    with torch.no_grad():
        layer.approx_weight.normal_()
        layer.approx_bias.normal_()
    return layer.eval()


def layer_model(layer: NenniLayer, opset: int = OPSET, outputs=("Y", "M"), tap_slices: bool = False) -> onnx.ModelProto:
    """One NenniConv / NenniLinear node with its tensors as initializers and its function body attached."""
    c, s = layer.exact, layer.spec
    tensors = {
        "W": c.folded_weight(),
        "B": c.bias,
        "P": layer.proj,
        "Wa": layer.quantized_approx_weight(),
        "Ba": layer.approx_bias,
    }
    inits = [numpy_helper.from_array(t.detach().numpy(), name) for name, t in tensors.items()]
    geometry = {}
    if layer.is_conv:
        geometry = dict(strides=list(c.stride), pads=[*c.padding, *c.padding], dilations=list(c.dilation))
    attrs = ops.layer_attributes(
        granularity=s.granularity,
        rank=s.rank,
        k=s.essential,
        ratio=s.ratio,
        nm=s.nm or (4, 8),
        threshold=s.threshold or 0.0,
        **geometry,
    )
    op_type = ops.CONV if layer.is_conv else ops.LINEAR
    node = helper.make_node(op_type, ["X", *tensors], list(outputs), domain=ops.DOMAIN, **attrs)
    kernel = tuple(c.kernel_size) if tap_slices and layer.is_conv else None
    node.overload = ops.overload_name(s.granularity, s.rank, kernel)
    x_shape = ["batch", c.in_channels, "h", "w"] if layer.is_conv else ["batch", c.in_features]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * len(x_shape))]
    if "M" in outputs:
        outs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, [None] * len(x_shape)))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)], outs, initializer=inits
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)],
        ir_version=10,
        functions=[ops.function_for_node(node, opset)],
    )


def test_schemas_are_registered_once_with_their_attributes():
    ops.register_schemas()
    ops.register_schemas()  # idempotent
    for op_type in ops.ALL_OPS:
        assert onnx.defs.has(op_type, ops.DOMAIN_VERSION, ops.DOMAIN)
    conv = onnx.defs.get_schema(ops.CONV, ops.DOMAIN_VERSION, ops.DOMAIN)
    assert [i.name for i in conv.inputs] == ["X", "W", "B", "P", "Wa", "Ba"]
    assert {"granularity", "rank", "k", "ratio", "nm", "threshold", "strides", "pads", "dilations"} <= set(
        conv.attributes
    )
    assert {"plugin_namespace", "plugin_version"} <= set(conv.attributes)
    noise = onnx.defs.get_schema(ops.NOISE, ops.DOMAIN_VERSION, ops.DOMAIN)
    assert {"mode", "scale", "residual_rms", "seed"} <= set(noise.attributes)


CASES = [
    ("conv", g, r, geo)
    for g in ops.GRANULARITIES
    for r in ops.RANKS
    for geo in ({}, {"stride": 2, "pad": 2, "dilation": 2})
] + [("conv", "channel", "signed", {"kernel": 1, "pad": 0}), ("conv", "nm", "magnitude", {"kernel": 5, "pad": 2})]
CASES += [("linear", g, r, {}) for g in ops.GRANULARITIES for r in ops.RANKS]


@pytest.mark.parametrize(("kind", "granularity", "rank", "geometry"), CASES)
def test_function_body_matches_the_pytorch_layer(kind, granularity, rank, geometry):
    layer = make_layer(kind, granularity, rank, **geometry)
    model = layer_model(layer)
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(5, 6, 9, 11) if kind == "conv" else torch.randn(5, 6)
    y, mask = session(model).run(None, {"X": x.numpy()})
    with torch.no_grad():
        expected = layer(x)
        expected_mask = select(layer.predict(x), layer.spec)
        if granularity == "channel":
            layer.execution = "skip"
            np.testing.assert_allclose(y, layer(x).numpy(), atol=2e-5, rtol=1e-5)
    assert y.shape == tuple(expected.shape)
    np.testing.assert_array_equal(mask, expected_mask.numpy())
    np.testing.assert_allclose(y, expected.numpy(), atol=2e-5, rtol=1e-5)


CHANNEL_CONV_CASES = [c for c in CASES if c[0] == "conv" and c[1] == "channel"]


@pytest.mark.parametrize(("kind", "granularity", "rank", "geometry"), CHANNEL_CONV_CASES)
def test_kernel_specific_channel_body_matches_the_pytorch_layer(kind, granularity, rank, geometry):
    """The tap-slice body (what the exporter attaches when it knows the kernel) against PyTorch, on strides,
    paddings, dilations and kernels where a slice end counted from the axis end would go wrong if miscounted."""
    layer = make_layer(kind, granularity, rank, **geometry)
    model = layer_model(layer, tap_slices=True)
    assert model.functions[0].overload.endswith(f"_k{layer.exact.kernel_size[0]}x{layer.exact.kernel_size[1]}")
    assert "Slice" in {n.op_type for n in model.functions[0].node}
    onnx.checker.check_model(model, full_check=True)
    for shape in [(5, 6, 9, 11), (1, 6, 8, 8), (3, 6, 10, 7)]:
        x = torch.randn(*shape)
        y, mask = session(model).run(None, {"X": x.numpy()})
        with torch.no_grad():
            expected = layer(x)
        np.testing.assert_array_equal(mask, select(layer.predict(x), layer.spec).numpy())
        np.testing.assert_allclose(y, expected.numpy(), atol=2e-5, rtol=1e-5)


def test_shape_inference_through_the_registered_schema():
    layer = make_layer("conv", "channel", "signed", stride=2, pad=1)
    inferred = onnx.shape_inference.infer_shapes(layer_model(layer), check_type=True, strict_mode=True)
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output}
    # Spatial sizes are symbolic here ("h", "w"), so only batch and channels are known.
    assert dims["Y"][:2] == ["batch", 16]
    assert inferred.graph.output[1].type.tensor_type.elem_type == TensorProto.BOOL
    fixed = layer_model(layer)
    fixed.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 9
    fixed.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 12
    inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=True)
    y = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in y] == ["batch", 16, 5, 6]


def test_optional_mask_output_can_be_omitted():
    layer = make_layer("conv", "element", "signed")
    model = layer_model(layer)
    model.graph.node[0].output[1] = ""
    del model.graph.output[1]
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(2, 6, 7, 7)
    (y,) = session(model).run(None, {"X": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, layer(x).numpy(), atol=2e-5, rtol=1e-5)


def _body_ops(function: onnx.FunctionProto) -> list[onnx.NodeProto]:
    return list(function.node)


@pytest.mark.parametrize("kind", [ops.CONV, ops.LINEAR])
def test_channel_body_computes_only_the_gathered_filters(kind):
    """The channel body never multiplies the full W: W reaches the maths only through a Gather of the
    selected rows, and the exact products are a batched MatMul on those rows, scattered into the prediction."""
    body = ops.layer_function(kind, "channel", "signed", OPSET)
    consumers = [n for n in body.node if "W" in n.input]
    assert consumers and all(n.op_type in ("Gather", "Reshape", "Shape") for n in consumers)
    assert not any(n.op_type in ("Conv", "Gemm") and "W" in n.input for n in body.node)
    kinds = {n.op_type for n in body.node}
    assert {"TopK", "Gather", "MatMul", "ScatterElements"} <= kinds
    masked = ops.layer_function(kind, "element", "signed", OPSET)
    assert any(n.op_type in ("Conv", "Gemm") and "W" in n.input for n in masked.node)  # dense, then masked


def noise_model(seed: float | None, scale: float = 2.0, rms: float = 0.25) -> onnx.ModelProto:
    attrs = ops.noise_attributes(scale=scale, residual_rms=rms, seed=None if seed is None else int(seed))
    node = helper.make_node(ops.NOISE, ["Y", "M"], ["Z"], domain=ops.DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", 64]),
            helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", 64]),
        ],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["b", 64])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ops.DOMAIN, 1)],
        ir_version=10,
        functions=[ops.noise_function(OPSET)],
    )


def _noise_feeds():
    y = np.linspace(-1, 1, 256 * 64, dtype=np.float32).reshape(256, 64)
    m = np.zeros_like(y, dtype=bool)
    m[:, :16] = True
    return {"Y": y, "M": m}


def test_noise_is_fresh_per_run_reproducible_under_a_seed_and_has_the_right_std():
    feeds = _noise_feeds()
    seeded = noise_model(seed=7)
    onnx.checker.check_model(seeded, full_check=True)
    a, b = session(seeded), session(seeded)
    first_a, second_a = a.run(None, feeds)[0], a.run(None, feeds)[0]
    first_b, second_b = b.run(None, feeds)[0], b.run(None, feeds)[0]
    np.testing.assert_array_equal(first_a, first_b)  # same seed: the same stream in a fresh session
    np.testing.assert_array_equal(second_a, second_b)
    assert not np.array_equal(first_a, second_a)  # but every run draws afresh
    other = session(noise_model(seed=8)).run(None, feeds)[0]
    assert not np.array_equal(first_a, other)
    unseeded = session(noise_model(seed=None))
    assert not np.array_equal(unseeded.run(None, feeds)[0], unseeded.run(None, feeds)[0])
    added = first_a - feeds["Y"]
    assert np.all(added[:, :16] == 0)  # essential neurons keep their exact value
    assert abs(added[:, 16:].std() - 0.5) < 0.02  # scale 2 * residual RMS 0.25
    assert abs(added[:, 16:].mean()) < 0.02


def test_random_normal_like_never_gets_scale_zero():
    for function in [ops.noise_function(OPSET)] + [
        ops.layer_function(op, g, r, OPSET) for op in ops.LAYER_OPS for g in ops.GRANULARITIES for r in ops.RANKS
    ]:
        for node in function.node:
            if node.op_type.startswith("Random"):
                scale = next(a for a in node.attribute if a.name == "scale")
                assert scale.f == 1.0 and not scale.ref_attr_name
    with pytest.raises(ValueError, match="scale > 0"):
        ops.noise_attributes(scale=0.0, residual_rms=1.0, seed=None)
    with pytest.raises(ValueError, match="scale > 0"):
        ops.noise_attributes(scale=1.0, residual_rms=0.0, seed=None)
    with pytest.raises(ValueError, match="seed"):
        ops.noise_attributes(scale=1.0, residual_rms=1.0, seed=2**30)


def test_layer_noise_seeds_are_distinct_and_exact_as_floats():
    seeds = [ops.layer_seed_for_noise(5, i) for i in range(200)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s <= ops.MAX_SEED and float(s) == s for s in seeds)


def test_layer_attributes_are_validated():
    base = dict(granularity="channel", rank="signed", k=2, ratio=0.5, nm=(2, 4), threshold=0.0)
    assert ops.layer_attributes(**base)["k"] == 2
    with pytest.raises(ValueError, match="granularity"):
        ops.layer_attributes(**{**base, "granularity": "block"})
    with pytest.raises(ValueError, match="rank"):
        ops.layer_attributes(**{**base, "rank": "abs"})
    with pytest.raises(ValueError, match="k must"):
        ops.layer_attributes(**{**base, "k": 0})
    with pytest.raises(ValueError, match="nm"):
        ops.layer_attributes(**{**base, "nm": (4, 4)})


@pytest.mark.parametrize(("kind", "granularity", "rank", "geometry"), [c for c in CASES if c[1] == "channel"])
def test_masked_channel_body_matches_the_pytorch_layer(kind, granularity, rank, geometry):
    """The masked lowering (dense exact layer, then select) gives the skipping body's outputs and mask."""
    layer = make_layer(kind, granularity, rank, **geometry)
    model = layer_model(layer)
    node = model.graph.node[0]
    node.overload = ops.overload_name(granularity, rank, lowering="masked")
    del model.functions[:]
    model.functions.append(ops.function_for_node(node, OPSET))
    body = model.functions[0]
    assert body.overload.endswith("_masked")
    assert any(n.op_type in ("Conv", "Gemm") and "W" in n.input for n in body.node)  # dense exact layer
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(5, 6, 9, 11) if kind == "conv" else torch.randn(5, 6)
    y, mask = session(model).run(None, {"X": x.numpy()})
    with torch.no_grad():
        np.testing.assert_array_equal(mask, select(layer.predict(x), layer.spec).numpy())
        np.testing.assert_allclose(y, layer(x).numpy(), atol=2e-5, rtol=1e-5)
