"""Will TensorRT's ONNX parser import this graph? A static check that needs no TensorRT.

The parser resolves each node in this order (onnx-tensorrt, TensorRT 10.x): its built-in importer for the op
type, then a model-local function of that name, then a plugin creator looked up by (op type, `plugin_version`
attribute, default "1", `plugin_namespace` attribute, default ""). The node's ONNX domain plays no part in the
first and last steps. So every node here must be either an op of `NATIVE_OPS` within its limits, or resolve to a
NENNI plugin of `ops.PLUGIN_SPECS` with the attributes the plugin declares; and no local function may carry a
plugin's name, since it would be imported instead of the plugin.

`NATIVE_OPS` is the parser's operator list for TensorRT 10.x (docs/operators.md of onnx-tensorrt) with the
restrictions that can be decided from the graph alone. Data-type and shape restrictions that need shape
inference are left to the parser itself (`nenni build` reports its errors by node).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from onnx import AttributeProto, ModelProto, NodeProto, helper, numpy_helper

from ..errors import NenniError
from . import ops

TOPK_MAX_K = 3840  # TensorRT's TopK needs K < 3840 (ITopKLayer)
MAX_LISTED = 5  # nodes named in one error line


@dataclass(frozen=True)
class Problem:
    node: str  # the node's name (or its first output when unnamed)
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.message}"


Limit = Callable[[NodeProto, "_Graph"], str | None]


class _Graph:
    """What the limits need to know about the graph: constant values (initializers and Constant nodes)."""

    def __init__(self, proto: ModelProto) -> None:
        self.constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        for node in proto.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                value = _attr(node, "value")
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
                elif _attr(node, "value_ints") is not None:
                    self.constants[node.output[0]] = list(_attr(node, "value_ints"))
                elif _attr(node, "value_int") is not None:
                    self.constants[node.output[0]] = [_attr(node, "value_int")]


def _attr(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


# -- limits of native ops ---------------------------------------------------------------------------------------
def _topk(node: NodeProto, g: _Graph) -> str | None:
    if len(node.input) < 2:  # opset < 10: K is an attribute
        k = _attr(node, "k")
    else:
        value = g.constants.get(node.input[1])
        if value is None:
            return "K must be a constant (an initializer or a Constant node) for TensorRT's TopK"
        k = int(list(getattr(value, "flat", value))[0])
    if k is None or k >= TOPK_MAX_K:
        return f"TopK with K = {k}: TensorRT needs K < {TOPK_MAX_K}"
    return None


def _no_reduction(node: NodeProto, g: _Graph) -> str | None:
    reduction = _attr(node, "reduction", "none")
    return None if reduction == "none" else f"reduction={reduction!r} is not supported (only 'none')"


def _spatial_2d_3d(node: NodeProto, g: _Graph) -> str | None:
    kernel = _attr(node, "kernel_shape")
    if kernel is None and len(node.input) > 1 and node.input[1] in g.constants:
        kernel = list(getattr(g.constants[node.input[1]], "shape", ()))[2:]
    if kernel is not None and len(kernel) not in (1, 2, 3):
        return f"{len(kernel)}-D {node.op_type}: TensorRT supports 1-D to 3-D only"
    return None


def _maxpool(node: NodeProto, g: _Graph) -> str | None:
    if len(node.output) > 1 and node.output[1]:
        return "MaxPool's Indices output is not supported"
    return _spatial_2d_3d(node, g)


def _pad(node: NodeProto, g: _Graph) -> str | None:
    mode = _attr(node, "mode", "constant")
    return None if mode in ("constant", "reflect", "edge", "wrap") else f"Pad mode {mode!r} is not supported"


def _resize(node: NodeProto, g: _Graph) -> str | None:
    mode = _attr(node, "mode", "nearest")
    return None if mode in ("nearest", "linear", "cubic") else f"Resize mode {mode!r} is not supported"


def _seed_ignored(node: NodeProto, g: _Graph) -> str | None:
    # Not an import failure, but a model relying on a seed would silently change meaning: refuse it.
    if _attr(node, "seed") is not None:
        return f"{node.op_type} has a seed, which TensorRT ignores (use the NenniNoise plugin for seeded noise)"
    return None


_PLAIN = (
    "Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention BatchNormalization BlackmanWindow Cast "
    "CastLike Ceil Celu Clip Concat Constant ConstantOfShape Cos Cosh CumSum DeformConv DepthToSpace "
    "DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor "
    "GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater "
    "GreaterOrEqual GridSample GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity "
    "If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log "
    "LogSoftmax Loop LpNormalization LpPool MatMul Max Mean MeanVarianceNormalization Min Mish Mod Mul Neg "
    "NonMaxSuppression NonZero Not OneHot Or PRelu ParametricSoftplus Pow QuantizeLinear RNN Range Reciprocal "
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
    "ReduceSumSquare Relu Reshape ReverseSequence RoiAlign Round STFT ScaledTanh Scan Selu Shape Shrink Sigmoid "
    "Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh "
    "ThresholdedRelu Tile Transpose Trilu Unsqueeze Upsample Where Xor"
)
NATIVE_OPS: dict[str, Limit | None] = {name: None for name in _PLAIN.split()}
NATIVE_OPS.update(
    {
        "TopK": _topk,
        "Conv": _spatial_2d_3d,
        "ConvTranspose": _spatial_2d_3d,
        "AveragePool": _spatial_2d_3d,
        "MaxPool": _maxpool,
        "Pad": _pad,
        "Resize": _resize,
        "Scatter": _no_reduction,
        "ScatterElements": _no_reduction,
        "ScatterND": _no_reduction,
        "RandomNormal": _seed_ignored,
        "RandomNormalLike": _seed_ignored,
        "RandomUniform": _seed_ignored,
        "RandomUniformLike": _seed_ignored,
    }
)
_STANDARD_DOMAINS = ("", "ai.onnx")


# -- plugins ----------------------------------------------------------------------------------------------------
_KINDS = {
    "str": (AttributeProto.STRING,),
    "int": (AttributeProto.INT,),
    "float": (AttributeProto.FLOAT,),
    "ints": (AttributeProto.INTS,),
}


def plugin_for(node: NodeProto) -> ops.PluginSpec | None:
    """The NENNI plugin the parser would find for `node`: by op type, `plugin_namespace` and `plugin_version`."""
    spec = ops.PLUGIN_SPECS.get(node.op_type)
    if spec is None:
        return None
    namespace, version = _attr(node, "plugin_namespace", ""), _attr(node, "plugin_version", "1")
    if (namespace, version) != (ops.PLUGIN_NAMESPACE, ops.PLUGIN_VERSION):
        return None
    return spec


def _plugin_problems(node: NodeProto, spec: ops.PluginSpec) -> list[str]:
    found = []
    present = {a.name: a for a in node.attribute}
    for name, kind in spec.attributes.items():
        if name not in present:
            found.append(f"missing attribute {name!r} that the plugin {spec.plugin_id} declares")
        elif present[name].type not in _KINDS[kind]:
            found.append(f"attribute {name!r} must be {kind}")
    extra = sorted(set(present) - set(spec.attributes) - set(ops.PLUGIN_ATTRIBUTES))
    if extra:
        found.append(f"attributes {extra} are not declared by the plugin {spec.plugin_id}")
    if len(node.input) != spec.inputs or not all(node.input):
        found.append(f"the plugin takes {spec.inputs} inputs, the node has {len([i for i in node.input if i])}")
    if len(node.output) > spec.outputs:
        found.append(f"the plugin has {spec.outputs} outputs, the node {len(node.output)}")
    return found


# -- the check --------------------------------------------------------------------------------------------------
def _label(node: NodeProto) -> str:
    return node.name or (node.output[0] if node.output else "?")


def _check_nodes(
    nodes: Iterable[NodeProto], g: _Graph, functions: dict[str, object], where: str, seen_functions: set[str]
) -> list[Problem]:
    problems: list[Problem] = []
    for node in nodes:
        label = where + _label(node)
        # 1. the built-in importer, whatever the node's domain
        if node.op_type in NATIVE_OPS:
            if node.domain not in _STANDARD_DOMAINS:
                problems.append(
                    Problem(label, node.op_type, f"custom-domain {node.domain} op shadows TensorRT's built-in op")
                )
                continue
            limit = NATIVE_OPS[node.op_type]
            message = limit(node, g) if limit else None
            if message:
                problems.append(Problem(label, node.op_type, message))
            continue
        # 2. a model-local function of that name
        if node.op_type in functions:
            if node.op_type in ops.PLUGIN_SPECS:
                problems.append(
                    Problem(
                        label,
                        node.op_type,
                        f"a model-local function {node.op_type!r} shadows the plugin "
                        f"{ops.PLUGIN_SPECS[node.op_type].plugin_id} (TensorRT imports the function first)",
                    )
                )
                continue
            if node.op_type not in seen_functions:  # check each body once, naming the calling node
                seen_functions.add(node.op_type)
                body = functions[node.op_type].node
                problems += _check_nodes(body, g, functions, f"{label}/", seen_functions)
            continue
        # 3. a plugin by (op type, namespace, version)
        spec = plugin_for(node)
        if spec is not None:
            problems += [Problem(label, node.op_type, m) for m in _plugin_problems(node, spec)]
            continue
        if node.op_type in ops.PLUGIN_SPECS:
            namespace, version = _attr(node, "plugin_namespace", ""), _attr(node, "plugin_version", "1")
            problems.append(
                Problem(
                    label,
                    node.op_type,
                    f"no plugin {namespace}::{node.op_type} version {version}; the NENNI plugin is "
                    f"{ops.PLUGIN_NAMESPACE}::{node.op_type} version {ops.PLUGIN_VERSION} "
                    "(export with --target tensorrt)",
                )
            )
            continue
        problems.append(Problem(label, node.op_type, "not supported by TensorRT's ONNX parser and no plugin for it"))
    return problems


def _mask_problems(proto: ModelProto) -> list[Problem]:
    """A layer plugin's mask is INT32 inside TensorRT (plugins exchange no bool tensors), so only the noise
    plugin, which expects exactly that, may read it; a graph output or a native op would get the wrong type."""
    readers: dict[str, list[NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}
    problems = []
    for node in proto.graph.node:
        spec = plugin_for(node)
        if spec is None or node.op_type == ops.NOISE or len(node.output) < 2 or not node.output[1]:
            continue
        mask = node.output[1]
        bad = [r for r in readers.get(mask, []) if not (r.op_type == ops.NOISE and plugin_for(r) is not None)]
        if mask in outputs or bad:
            who = ", ".join([_label(r) for r in bad] + (["the graph output"] if mask in outputs else []))
            problems.append(
                Problem(_label(node), node.op_type, f"its mask {mask!r} is read by {who}; only NenniNoise may read it")
            )
    return problems


def tensorrt_problems(proto: ModelProto) -> list[Problem]:
    """Every node TensorRT's parser would reject or mis-resolve, with the reason; empty when the graph is ready."""
    functions = {f.name: f for f in proto.functions}
    return _check_nodes(proto.graph.node, _Graph(proto), functions, "", set()) + _mask_problems(proto)


def check_tensorrt_graph(proto: ModelProto, where: str = "the model") -> None:
    """Raise one NenniError line naming the offending nodes (the first few, and how many in all)."""
    problems = tensorrt_problems(proto)
    if problems:
        listed = "; ".join(map(str, problems[:MAX_LISTED]))
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise NenniError(f"{where} is not ready for TensorRT: {len(problems)} node problem(s): {listed}{more}")
