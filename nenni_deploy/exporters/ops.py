"""The NENNI ONNX ops: the one definition of each custom op (schema, shape inference, function bodies).

Domain `ai.nenni`, version 1. Three ops, each a single node in the exported graph:

- `NenniConv(X, W, B, P, Wa, Ba) -> (Y, M?)`: a NENNI convolution. W, B are the exact (batch-norm folded)
  weight and bias, P the (k, C_in, kh, kw) ternary projection, Wa the (n, k) fake-quantised approximator and
  Ba its bias. The prediction z~ = Conv1x1(Conv(X, P), Wa) + Ba chooses the essential neurons; they take the
  exact value Conv(X, W) + B, the others keep z~. M (optional) is the boolean essential mask, shape of Y.
- `NenniLinear(X, W, B, P, Wa, Ba) -> (Y, M?)`: the same for a linear layer on (batch, d) inputs; P is (k, d).
- `NenniNoise(Y, M) -> Z`: explicit noise on the non-essential neurons, Z = where(M, Y, Y + s * r * e) with
  e ~ N(0, 1) fresh on every run, s = `scale` (a multiple of the layer's residual RMS r = `residual_rms`).

Attributes of the layer ops: `granularity` (element | threshold | nm | channel), `rank` (signed | magnitude),
`k` (K: essential channels per position or per sample), `ratio` (the fraction K was resolved from; for
reading only), `nm` ([N, M]), `threshold`, and for NenniConv `strides`, `pads` ([top, left, bottom, right]),
`dilations`. The TensorRT target adds `plugin_namespace` and `plugin_version`.

Each layer op has one model-local function body per (granularity, rank), selected by the node's `overload`
field (ONNX IR 10) and written only in standard ONNX ops, so that stock ONNX Runtime runs the op by inlining
it. The bodies refer to the node's attributes, so one body serves every layer of its kind. `channel` really
skips: it computes the exact output only for the K selected filters of each sample (im2col by Gather, then a
batched MatMul with the gathered filter rows, then ScatterElements into the prediction), because a grouped
convolution's `group` cannot follow a dynamic batch. The other granularities compute densely and mask.

The noise body draws with `RandomNormalLike(scale=1)` and multiplies by the standard deviation afterwards: a
`RandomNormalLike` with scale 0 aborts ONNX Runtime, so the scale given to it is never 0. Its `seed`
attribute is passed through when the node has one (reproducible from session to session, still fresh on
every run); without it ONNX Runtime seeds itself.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper
from onnx.defs import OpSchema

DOMAIN = "ai.nenni"
DOMAIN_VERSION = 1
SUPPORTED_DOMAIN_VERSIONS = (1,)

CONV = "NenniConv"
LINEAR = "NenniLinear"
NOISE = "NenniNoise"
LAYER_OPS = (CONV, LINEAR)
ALL_OPS = (CONV, LINEAR, NOISE)

GRANULARITIES = ("element", "threshold", "nm", "channel")
RANKS = ("signed", "magnitude")
NOISE_MODES = ("gaussian",)

# TensorRT's parser looks plugins up by (op_type, plugin_version, plugin_namespace).
PLUGIN_NAMESPACE = "nenni"
PLUGIN_VERSION = "1"
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")
# A TensorRT plugin's attributes are fixed at registration, so an unseeded noise node still carries `seed`,
# with this value meaning "no seed": the plugin then draws one per engine load.
UNSEEDED = -1.0

# ONNX Runtime reads the RandomNormalLike seed as a float: keep seeds exactly representable.
MAX_SEED = 2**24 - 1

_A = OpSchema.AttrType
_LAYER_INPUTS = (
    ("X", "T", "input: (batch, C_in, H, W) for NenniConv, (batch, d) for NenniLinear"),
    ("W", "T", "exact weight, batch norm folded in: (n, C_in, kh, kw) or (n, d)"),
    ("B", "T", "exact bias: (n,)"),
    ("P", "T", "ternary projection: (k, C_in, kh, kw) or (k, d)"),
    ("Wa", "T", "approximator weight, already fake-quantised: (n, k)"),
    ("Ba", "T", "approximator bias: (n,)"),
)


# -- schemas ----------------------------------------------------------------------------------------------------
def _default(name: str, value, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, helper.make_attribute(name, value), doc)


# The int8 form (`nenni export --int8`, exporters/int8.py): a node carrying these runs its `_int8` body
# (exporters/ops_int8.py). Activation scales and zero points are calibrated; weights stay float in the node and
# are quantized per filter inside the body, which ONNX Runtime constant-folds at load.
_INT8_ATTRIBUTES = (
    ("x_scale", _A.FLOAT, "int8 form: scale of the uint8 input X"),
    ("x_zero_point", _A.INT, "int8 form: zero point of the uint8 input X"),
    ("u_scale", _A.FLOAT, "int8 form: scale of the uint8 projection P x"),
    ("u_zero_point", _A.INT, "int8 form: zero point of the uint8 projection"),
    ("y_scale", _A.FLOAT, "int8 form: scale of the uint8 exact output (bodies that compute it densely)"),
    ("y_zero_point", _A.INT, "int8 form: zero point of the uint8 exact output"),
    ("w_bits", _A.INT, "int8 form: bits of the symmetric per-filter exact weights (8, or 7 for reduced range)"),
    ("approx_bits", _A.INT, "int8 form: bits of the approximator weights (its fake-quantisation grid, at most 8)"),
)
INT8_ATTRIBUTE_NAMES = tuple(name for name, _, _ in _INT8_ATTRIBUTES)


def _layer_attributes(conv: bool) -> list[OpSchema.Attribute]:
    attrs = [
        OpSchema.Attribute("granularity", _A.STRING, "element | threshold | nm | channel", required=True),
        _default("rank", "signed", "rank by the signed prediction or by its magnitude"),
        _default("k", 1, "K: essential channels per position (element) or per sample (channel)"),
        _default("ratio", 0.0, "the essential fraction K was resolved from (for reading only)"),
        _default("nm", [4, 8], "[N, M]: the N largest of every M consecutive channels (nm)"),
        _default("threshold", 0.0, "score threshold (threshold granularity)"),
        OpSchema.Attribute("plugin_namespace", _A.STRING, "TensorRT plugin namespace", required=False),
        OpSchema.Attribute("plugin_version", _A.STRING, "TensorRT plugin version", required=False),
        *(OpSchema.Attribute(name, kind, doc, required=False) for name, kind, doc in _INT8_ATTRIBUTES),
        OpSchema.Attribute("batch", _A.INT, "the graph's static batch size (grouped lowering)", required=False),
    ]
    if conv:
        attrs += [
            _default("strides", [1, 1], "convolution strides"),
            _default("pads", [0, 0, 0, 0], "convolution pads [top, left, bottom, right]"),
            _default("dilations", [1, 1], "convolution dilations"),
        ]
    return attrs


def _layer_schema(op_type: str) -> OpSchema:
    conv = op_type == CONV
    kind = "convolution" if conv else "linear layer"
    schema = OpSchema(
        op_type,
        DOMAIN,
        DOMAIN_VERSION,
        f"NENNI {kind}: projection-based prediction, essential selection, exact computation of the essential "
        "neurons, the prediction for the rest (see nenni_deploy.exporters.ops).",
        inputs=[OpSchema.FormalParameter(name, t, doc) for name, t, doc in _LAYER_INPUTS],
        outputs=[
            OpSchema.FormalParameter("Y", "T", "output: exact where essential, the prediction elsewhere"),
            OpSchema.FormalParameter(
                "M", "tensor(bool)", "essential mask, shape of Y", param_option=OpSchema.FormalParameterOption.Optional
            ),
        ],
        type_constraints=[("T", ["tensor(float)"], "float32 tensors")],
        attributes=_layer_attributes(conv),
    )
    schema.set_type_and_shape_inference_function(_infer_conv if conv else _infer_linear)
    return schema


def _noise_schema() -> OpSchema:
    schema = OpSchema(
        NOISE,
        DOMAIN,
        DOMAIN_VERSION,
        "Explicit NENNI noise: Z = where(M, Y, Y + scale * residual_rms * e), e ~ N(0, 1) fresh on every run.",
        inputs=[
            OpSchema.FormalParameter("Y", "T", "a NENNI layer's output"),
            OpSchema.FormalParameter("M", "tensor(bool)", "its essential mask (no noise where true)"),
        ],
        outputs=[OpSchema.FormalParameter("Z", "T", "Y with noise on the non-essential neurons")],
        type_constraints=[("T", ["tensor(float)"], "float32 tensors")],
        attributes=[
            _default("mode", "gaussian", "noise distribution"),
            _default("scale", 1.0, "standard deviation as a multiple of residual_rms"),
            _default("residual_rms", 1.0, "the layer's measured residual RMS of the prediction"),
            OpSchema.Attribute(
                "seed", _A.FLOAT, "seed (integer valued); absent or negative: fresh seed", required=False
            ),
            OpSchema.Attribute("plugin_namespace", _A.STRING, "TensorRT plugin namespace", required=False),
            OpSchema.Attribute("plugin_version", _A.STRING, "TensorRT plugin version", required=False),
        ],
        node_determinism=OpSchema.NodeDeterminism.NonDeterministic,
    )
    schema.set_type_and_shape_inference_function(_infer_same)
    return schema


_REGISTER_LOCK = threading.Lock()
_SCHEMAS: dict[str, OpSchema] = {}  # keeps the Python inference callbacks alive


def register_schemas() -> None:
    """Register the three schemas with onnx (idempotent): the checker, shape inference and the torch exporter
    then accept the ops."""
    with _REGISTER_LOCK:
        for op_type, build in ((CONV, lambda: _layer_schema(CONV)), (LINEAR, lambda: _layer_schema(LINEAR))):
            _register(op_type, build)
        _register(NOISE, _noise_schema)


def _register(op_type: str, build) -> None:
    if op_type in _SCHEMAS or onnx.defs.has(op_type, DOMAIN_VERSION, DOMAIN):
        return
    schema = build()
    onnx.defs.register_schema(schema)
    _SCHEMAS[op_type] = schema


# -- shape inference --------------------------------------------------------------------------------------------
Dim = int | str | None


def _dims(t: onnx.TypeProto | None) -> list[Dim] | None:
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[Dim] = []
    for d in t.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _attr_ints(ctx, name: str, default: list[int]) -> list[int]:
    attr = ctx.get_attribute(name)
    return list(attr.ints) if attr is not None and attr.ints else default


def _set_outputs(ctx, elem_type: int, shape: list[Dim] | None) -> None:
    ctx.set_output_type(0, helper.make_tensor_type_proto(elem_type, shape))
    if ctx.get_num_outputs() > 1 and ctx.has_output(1):
        ctx.set_output_type(1, helper.make_tensor_type_proto(TensorProto.BOOL, shape))


def _elem_type(ctx) -> int:
    t = ctx.get_input_type(0)
    return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else TensorProto.FLOAT


def _conv_extent(size: Dim, kernel: Dim, stride: int, pad: int, dilation: int) -> Dim:
    if not isinstance(size, int) or not isinstance(kernel, int):
        return None
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def _infer_conv(ctx) -> None:
    x, w = _dims(ctx.get_input_type(0)), _dims(ctx.get_input_type(1))
    shape = None
    if x is not None and len(x) == 4 and w is not None and len(w) == 4:
        strides = _attr_ints(ctx, "strides", [1, 1])
        pads = _attr_ints(ctx, "pads", [0, 0, 0, 0])
        dilations = _attr_ints(ctx, "dilations", [1, 1])
        spatial = [_conv_extent(x[2 + i], w[2 + i], strides[i], pads[i] + pads[i + 2], dilations[i]) for i in range(2)]
        shape = [x[0], w[0], *spatial]
    _set_outputs(ctx, _elem_type(ctx), shape)


def _infer_linear(ctx) -> None:
    x, w = _dims(ctx.get_input_type(0)), _dims(ctx.get_input_type(1))
    shape = [x[0], w[0]] if x is not None and len(x) == 2 and w is not None and len(w) == 2 else None
    _set_outputs(ctx, _elem_type(ctx), shape)


def _infer_same(ctx) -> None:
    ctx.set_output_type(0, helper.make_tensor_type_proto(_elem_type(ctx), _dims(ctx.get_input_type(0))))


# -- node attributes --------------------------------------------------------------------------------------------
CHANNEL_LOWERINGS = ("skip", "masked", "grouped")
STATIC_BATCH_LOWERINGS = ("grouped",)  # need the batch size in the graph (a convolution's `group`)


def overload_name(
    granularity: str, rank: str, kernel: Sequence[int] | None = None, lowering: str = "skip", int8: bool = False
) -> str:
    """Which function body implements a layer node: one per (granularity, rank), and for channel convolutions
    whose kernel size is known, one per kernel size (`channel_signed_k3x3`): that body cuts its patches with
    one strided Slice per kernel tap instead of a Gather over computed offsets, several times faster in ORT.
    `lowering="masked"` picks the channel body that computes the exact layer densely (a prepacked convolution)
    and selects: the same outputs, no skipping, faster in ORT on CPU where explicit patches cost more than the
    whole dense convolution. `lowering="grouped"` (channel convolutions of a static-batch graph) runs the exact
    path as one convolution with a group per sample over the gathered filters (node attribute `batch`).
    `int8` appends `_int8`: the same op on uint8 activations and int8 weights
    (exporters/ops_int8.py)."""
    if int8:
        return overload_name(granularity, rank, kernel, lowering) + INT8_SUFFIX
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    if rank not in RANKS:
        raise ValueError(f"unknown rank {rank!r}")
    if lowering not in CHANNEL_LOWERINGS:
        raise ValueError(f"unknown channel lowering {lowering!r}")
    if lowering in ("masked", "grouped") and granularity == "channel":
        return f"{granularity}_{rank}_{lowering}"
    if kernel is not None and granularity == "channel":
        kh, kw = (int(v) for v in kernel)
        if kh < 1 or kw < 1:
            raise ValueError(f"kernel must be positive, got {list(kernel)}")
        return f"{granularity}_{rank}_k{kh}x{kw}"
    return f"{granularity}_{rank}"


INT8_SUFFIX = "_int8"


def is_int8_overload(overload: str) -> bool:
    return overload.endswith(INT8_SUFFIX)


def _float_part(overload: str) -> str:
    return overload[: -len(INT8_SUFFIX)] if is_int8_overload(overload) else overload


def lowering_of_overload(overload: str) -> str:
    tail = _float_part(overload).rsplit("_", 1)[-1]
    return tail if tail in CHANNEL_LOWERINGS else "skip"


def kernel_of_overload(overload: str) -> tuple[int, int] | None:
    tail = _float_part(overload).rsplit("_", 1)[-1]
    if tail.startswith("k") and "x" in tail:
        kh, kw = tail[1:].split("x")
        return int(kh), int(kw)
    return None


def layer_attributes(
    *,
    granularity: str,
    rank: str,
    k: int,
    ratio: float,
    nm: Sequence[int],
    threshold: float,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
) -> dict:
    """The attributes of a NenniConv (with geometry) or NenniLinear node, validated."""
    overload_name(granularity, rank)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(nm) != 2 or not 0 < nm[0] < nm[1]:
        raise ValueError(f"nm must be [N, M] with 0 < N < M, got {list(nm)}")
    attrs = dict(
        granularity=granularity,
        rank=rank,
        k=int(k),
        ratio=float(ratio),
        nm=[int(v) for v in nm],
        threshold=float(threshold),
    )
    if strides is not None:
        attrs.update(strides=list(strides), pads=list(pads), dilations=list(dilations))
    return attrs


def noise_attributes(*, scale: float, residual_rms: float, seed: int | None) -> dict:
    """Attributes of a NenniNoise node; a non-positive standard deviation is refused (it is no noise)."""
    if not (scale > 0 and residual_rms > 0):
        raise ValueError(f"noise needs scale > 0 and residual_rms > 0, got {scale} and {residual_rms}")
    attrs = dict(mode="gaussian", scale=float(scale), residual_rms=float(residual_rms))
    if seed is not None:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"noise seed must be in [0, {MAX_SEED}], got {seed}")
        attrs["seed"] = float(seed)
    return attrs


@dataclass(frozen=True)
class PluginSpec:
    """What a TensorRT plugin for one op expects: its registered id, inputs, outputs and attributes (name -> kind:
    str, int, float or ints). The exporter's `--target tensorrt` nodes, the static checker and the plugin
    definitions in `runtime.tensorrt.plugins` all read this one table."""

    op_type: str
    inputs: int
    outputs: int
    attributes: dict[str, str]

    @property
    def plugin_id(self) -> str:
        return f"{PLUGIN_NAMESPACE}::{self.op_type}"


_LAYER_PLUGIN_ATTRIBUTES = {
    "granularity": "str",
    "rank": "str",
    "k": "int",
    "ratio": "float",
    "nm": "ints",
    "threshold": "float",
}
PLUGIN_SPECS = {
    CONV: PluginSpec(CONV, 6, 2, {**_LAYER_PLUGIN_ATTRIBUTES, "strides": "ints", "pads": "ints", "dilations": "ints"}),
    LINEAR: PluginSpec(LINEAR, 6, 2, dict(_LAYER_PLUGIN_ATTRIBUTES)),
    NOISE: PluginSpec(NOISE, 2, 1, {"mode": "str", "scale": "float", "residual_rms": "float", "seed": "float"}),
}


def layer_seed_for_noise(seed: int, index: int) -> int:
    """One noise stream per layer: nodes sharing a seed would draw identical noise."""
    return (int(seed) * 1000003 + 7919 * (index + 1)) % (MAX_SEED + 1)


# -- function bodies --------------------------------------------------------------------------------------------
# Stages of a layer body. Node names start with their stage, so that an operator profile (ONNX Runtime keeps
# these names, prefixed by the calling node, when it inlines a function) splits time into the NENNI parts.
STAGES = ("project", "approximate", "select", "exact", "fill", "noise")


class _Body:
    """Collects the nodes of one function body; every call returns fresh value names and a node name that
    starts with the current stage (`stage = ...` before each part)."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []
        self._count = 0
        self.stage = "select"

    def __call__(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, refs=None, **attrs):
        self._count += 1
        # Stage-prefixed value names too: ORT names nodes it creates (NCHWc convolutions) after their outputs.
        base = f"{self.stage}.{op_type.lower()}_{self._count}"
        if isinstance(outputs, int):
            names = [base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)]
        else:
            names = list(outputs)
        node = helper.make_node(op_type, list(inputs), names, name=f"{self.stage}.{op_type}_{self._count}", **attrs)
        for attr_name, (ref, attr_type) in (refs or {}).items():
            node.attribute.append(helper.make_attribute_ref(attr_name, attr_type, ref_attr_name=ref))
        self.nodes.append(node)
        return names[0] if len(names) == 1 else tuple(names)

    def ints(self, values: Sequence[int]) -> str:
        return self("Constant", value_ints=list(values))

    def int_(self, value: int) -> str:
        return self("Constant", value_int=int(value))

    def ref(self, attr: str, kind: str) -> str:
        """A Constant holding the calling node's attribute (kind: int, ints, float)."""
        attr_type = {"int": AttributeProto.INT, "ints": AttributeProto.INTS, "float": AttributeProto.FLOAT}[kind]
        return self("Constant", refs={f"value_{kind}": (attr, attr_type)})


_GEOMETRY_REFS = {
    "strides": ("strides", AttributeProto.INTS),
    "pads": ("pads", AttributeProto.INTS),
    "dilations": ("dilations", AttributeProto.INTS),
}


def _prediction(b: _Body, conv: bool, rank: str) -> tuple[str, str]:
    """(z~, ranking score): z~ = Wa (P x) + Ba, the score z~ or |z~|."""
    b.stage = "project"
    u = b("Conv", "X", "P", refs=_GEOMETRY_REFS) if conv else b("Gemm", "X", "P", transB=1)
    b.stage = "approximate"
    if conv:
        pred = b("Conv", u, b("Unsqueeze", "Wa", b.ints([2, 3])), "Ba")
    else:
        pred = b("Gemm", u, "Wa", "Ba", transB=1)
    b.stage = "select"
    return pred, (b("Abs", pred) if rank == "magnitude" else pred)


def _exact(b: _Body, conv: bool) -> str:
    b.stage = "exact"
    if conv:
        return b("Conv", "X", "W", "B", refs=_GEOMETRY_REFS)
    return b("Gemm", "X", "W", "B", transB=1)


def _bool_fill(b: _Body, shape: str, value: bool) -> str:
    return b("ConstantOfShape", shape, value=helper.make_tensor("v", TensorProto.BOOL, [1], [value]))


def _scatter_mask(b: _Body, like: str, idx: str, axis: int) -> str:
    """A boolean mask shaped like `like`, true at `idx` along `axis` (ScatterElements of trues into falses)."""
    return b(
        "ScatterElements",
        _bool_fill(b, b("Shape", like), False),
        idx,
        _bool_fill(b, b("Shape", idx), True),
        axis=axis,
    )


def _k(b: _Body) -> str:
    return b("Unsqueeze", b.ref("k", "int"), b.ints([0]))


def _mask(b: _Body, score: str, granularity: str, conv: bool = False) -> str:
    if granularity == "channel":
        idx, channel_score = _channel_indices(b, score, [2, 3] if conv else None, ascending=False)
        mask = _scatter_mask(b, channel_score, idx, axis=1)  # (B, n)
        return b("Expand", b("Unsqueeze", mask, b.ints([2, 3])), b("Shape", score)) if conv else mask
    if granularity == "element":
        _, idx = b("TopK", score, _k(b), outputs=2, axis=1, largest=1, sorted=1)
        return _scatter_mask(b, score, idx, axis=1)
    if granularity == "threshold":
        return b("Greater", score, b.ref("threshold", "float"))
    if granularity == "nm":
        nm = b.ref("nm", "ints")
        n = b("Slice", nm, b.ints([0]), b.ints([1]))
        m = b("Slice", nm, b.ints([1]), b.ints([2]))
        shape = b("Shape", score)
        spatial = b("Slice", shape, b.ints([2]), b.ints([2**62]))  # empty for a linear layer
        grouped = b("Reshape", score, b("Concat", b.ints([0, -1]), m, spatial, axis=0))
        _, idx = b("TopK", grouped, n, outputs=2, axis=2, largest=1, sorted=1)
        return b("Reshape", _scatter_mask(b, grouped, idx, axis=2), shape)
    raise ValueError(f"granularity {granularity!r} has no masked body")


def _masked_body(b: _Body, conv: bool, granularity: str, rank: str) -> None:
    pred, score = _prediction(b, conv, rank)
    mask = _mask(b, score, granularity, conv)
    exact = _exact(b, conv)
    b.stage = "fill"
    b("Where", mask, exact, pred, outputs=["Y"])
    b("Identity", mask, outputs=["M"])


def _channel_indices(
    b: _Body, score: str, spatial_axes: Sequence[int] | None, ascending: bool = True
) -> tuple[str, str]:
    """(B, K) indices of the top-K channel scores (the mean over `spatial_axes` of a convolution's scores), and
    the (B, n) channel scores. `ascending` sorts the indices as selection.channel_indices does (the same filter
    order on every runtime); bodies that only need the set skip that sort."""
    channel_score = b("ReduceMean", score, b.ints(spatial_axes), keepdims=0) if spatial_axes else score
    k = _k(b)
    _, top = b("TopK", channel_score, k, outputs=2, axis=1, largest=1, sorted=int(ascending))
    if ascending:
        top, _ = b("TopK", top, k, outputs=2, axis=1, largest=0, sorted=1)
    return top, channel_score


def _scalar(b: _Body, vector: str, i: int) -> str:
    return b("Gather", vector, b.int_(i), axis=0)


def _im2col(b: _Body) -> tuple[str, str]:
    """Patches of X as (B, C_in * kh * kw, L) with L = H_out * W_out, in W's flattening order; also [L].

    Pad, flatten the spatial map, and Gather the flat offsets (kh, kw, H_out, W_out) built from Range: every
    shape comes from the tensors and the attributes, so one body serves every convolution and any batch.
    """
    pads, strides, dilations = b.ref("pads", "ints"), b.ref("strides", "ints"), b.ref("dilations", "ints")
    padded = b("Pad", "X", pads, b("Constant", value_float=0.0), b.ints([2, 3]))
    xshape, wshape = b("Shape", padded), b("Shape", "W")
    zero, one = b.int_(0), b.int_(1)
    offsets, lengths = [], []
    for axis in (0, 1):  # height, width
        size, kernel = _scalar(b, xshape, 2 + axis), _scalar(b, wshape, 2 + axis)
        stride, dilation = _scalar(b, strides, axis), _scalar(b, dilations, axis)
        span = b("Add", b("Mul", dilation, b("Sub", kernel, one)), one)
        out = b("Add", b("Div", b("Sub", size, span), stride), one)
        positions = b("Mul", b("Range", zero, out, one), stride)  # (out,)
        taps = b("Mul", b("Range", zero, kernel, one), dilation)  # (kernel,)
        tap_shape, pos_shape = ([-1, 1, 1, 1], [1, 1, -1, 1]) if axis == 0 else ([1, -1, 1, 1], [1, 1, 1, -1])
        offset = b("Add", b("Reshape", taps, b.ints(tap_shape)), b("Reshape", positions, b.ints(pos_shape)))
        offsets.append(offset)
        lengths.append(out)
    width = _scalar(b, xshape, 3)
    flat_index = b("Add", b("Mul", offsets[0], width), offsets[1])  # (kh, kw, H_out, W_out)
    length = b("Unsqueeze", b("Mul", lengths[0], lengths[1]), b.ints([0]))  # [L]
    flat_index = b("Reshape", flat_index, b("Concat", b.ints([-1]), length, axis=0))  # (kh * kw, L)
    flat_x = b("Reshape", padded, b.ints([0, 0, -1]))  # (B, C_in, Hp * Wp)
    patches = b("Gather", flat_x, flat_index, axis=2)  # (B, C_in, kh * kw, L)
    return b("Reshape", patches, b("Concat", b.ints([0, -1]), length, axis=0)), length


_BIG = 2**62  # a Slice end meaning "to the end"


def _tap_columns(b: _Body, kernel: tuple[int, int], source: str = "X", pad_value: str | None = None) -> str:
    """Patches of `source` as (B, kh * kw * C_in, H_out, W_out), tap-major; padded with `pad_value` (a scalar
    of the source's type; default float 0).

    One strided Slice of the padded input per kernel tap. The end of each slice counts back from the end
    of the axis, so its length is the convolution's output size whatever the input size, and every index
    comes from attributes and constants: ONNX Runtime folds them all at load time.
    """
    kh, kw = kernel
    pads, strides, dilations = b.ref("pads", "ints"), b.ref("strides", "ints"), b.ref("dilations", "ints")
    pad_value = pad_value or b("Constant", value_float=0.0)
    padded = b("Pad", source, pads, pad_value, b.ints([2, 3]))
    axes = b.ints([2, 3])
    taps = []
    for ty in range(kh):
        for tx in range(kw):
            start = b("Mul", dilations, b.ints([ty, tx]))
            back = b("Mul", dilations, b.ints([ty - (kh - 1), tx - (kw - 1)]))  # <= 0; 0 on the last tap
            end = b("Add", back, b.ints([_BIG if ty == kh - 1 else 0, _BIG if tx == kw - 1 else 0]))
            taps.append(b("Slice", padded, start, end, axes, strides))
    return b("Concat", *taps, axis=1) if len(taps) > 1 else taps[0]


def _tap_rows(b: _Body, weight: str) -> str:
    """A (rows, C_in, kh, kw) filter bank as (rows, kh * kw * C_in), in `_tap_columns`' order."""
    return b("Reshape", b("Transpose", weight, perm=[0, 2, 3, 1]), b.ints([0, -1]))


def _channel_conv_body(b: _Body, rank: str, kernel: tuple[int, int]) -> None:
    """Channel convolution around one set of patches, shared by the projection and the exact path.

    Patches (B, d, L) are cut once; the projection is P (k, d) times them, the prediction Wa u + Ba, the
    channel scores its spatial mean; the K selected filters of each sample are gathered and multiplied with
    the same patches; their outputs are scattered into the prediction. Dense convolutions with few output
    channels (the projection: k = 2-8 here) cost ORT about as much as the full layer, which a shared
    im2col avoids.
    """
    b.stage = "project"
    patches = _tap_columns(b, kernel)  # (B, d, H_out, W_out)
    out_shape = b("Shape", patches)
    cols = b("Reshape", patches, b.ints([0, 0, -1]))  # (B, d, L)
    u = b("MatMul", _tap_rows(b, "P"), cols)  # (B, k, L)
    b.stage = "approximate"
    pred = b("Add", b("MatMul", "Wa", u), b("Unsqueeze", "Ba", b.ints([1])))  # (B, n, L)
    b.stage = "select"
    score = b("Abs", pred) if rank == "magnitude" else pred
    # The set of channels is what matters, not their order: no sorting.
    idx, channel_score = _channel_indices(b, score, [2], ascending=False)  # (B, K), (B, n)
    b.stage = "exact"
    rows = b("Gather", _tap_rows(b, "W"), idx, axis=0)  # (B, K, d)
    bias = b("Unsqueeze", b("Gather", "B", idx, axis=0), b.ints([2]))
    exact = b("Add", b("MatMul", rows, cols), bias)  # (B, K, L)
    _channel_conv_fill(b, pred, idx, exact, out_shape, channel_score)


def _row_indices(b: _Body, idx: str) -> str:
    """(B, K, 2) indices [sample, channel] of the selected rows: ScatterND writes whole rows of L values (one
    copy each), where ScatterElements indexes every element (about 9x slower in ORT at batch 64)."""
    samples = b("Range", b.int_(0), b("Gather", b("Shape", idx), b.int_(0), axis=0), b.int_(1))
    samples = b("Expand", b("Unsqueeze", samples, b.ints([1])), b("Shape", idx))  # (B, K)
    return b("Concat", b("Unsqueeze", samples, b.ints([2])), b("Unsqueeze", idx, b.ints([2])), axis=2)


def _channel_conv_fill(b: _Body, pred: str, idx: str, exact: str, out_shape: str, channel_score: str) -> None:
    """The exact rows (B, K, L) overwrite the prediction (B, n, L) at the selected channels; Y and M reshaped
    to (B, n, H_out, W_out) (`out_shape` is the patches' shape, whose batch and spatial dims Y keeps)."""
    b.stage = "fill"
    filled = b("ScatterND", pred, _row_indices(b, idx), exact)
    n = b("Shape", "W", start=0, end=1)
    y_shape = b(
        "Concat",
        b("Slice", out_shape, b.ints([0]), b.ints([1])),
        n,
        b("Slice", out_shape, b.ints([2]), b.ints([4])),
        axis=0,
    )
    b("Reshape", filled, y_shape, outputs=["Y"])
    channel_mask = _scatter_mask(b, channel_score, idx, axis=1)
    b("Expand", b("Unsqueeze", channel_mask, b.ints([2, 3])), y_shape, outputs=["M"])


def _channel_grouped_body(b: _Body, rank: str) -> None:
    """Channel convolution of a static-batch graph: the prediction as in the masked body, then the K selected
    filters of every sample in one convolution whose groups are the samples (X seen as (1, B * C_in, H, W)):
    the convolution kernel reads the input in place, with no explicit patches."""
    pred, score = _prediction(b, True, rank)
    idx, channel_score = _channel_indices(b, score, [2, 3], ascending=False)  # (B, K), (B, n)
    b.stage = "exact"
    w_shape = b("Shape", "W")
    rows = b("Reshape", b("Gather", "W", idx, axis=0), b("Concat", b.ints([-1]), _tail(b, w_shape, 1), axis=0))
    bias = b("Reshape", b("Gather", "B", idx, axis=0), b.ints([-1]))  # (B * K,)
    exact = b("Conv", _as_groups(b, "X"), rows, bias, refs=_GROUPED_REFS)  # (1, B * K, H_out, W_out)
    exact = b("Reshape", exact, b("Concat", b("Shape", idx), b.ints([-1]), axis=0))  # (B, K, L)
    out_shape = b("Shape", pred)
    _channel_conv_fill(b, b("Reshape", pred, b.ints([0, 0, -1])), idx, exact, out_shape, channel_score)


_GROUPED_REFS = {**_GEOMETRY_REFS, "group": ("batch", AttributeProto.INT)}


def _tail(b: _Body, shape: str, start: int) -> str:
    return b("Slice", shape, b.ints([start]), b.ints([_BIG]))


def _as_groups(b: _Body, x: str) -> str:
    """(B, C, H, W) as (1, B * C, H, W): one convolution group per sample."""
    return b("Reshape", x, b("Concat", b.ints([1, -1]), _tail(b, b("Shape", x), 2), axis=0))


def _channel_body(b: _Body, conv: bool, rank: str) -> None:
    """Channel granularity for any layer: im2col by Gather over computed offsets (any kernel, any shape)."""
    pred, score = _prediction(b, conv, rank)
    idx, channel_score = _channel_indices(b, score, [2, 3] if conv else None)  # (B, K), (B, n)
    b.stage = "exact"
    bias = b("Gather", "B", idx, axis=0)  # (B, K)
    if conv:
        cols, _ = _im2col(b)  # (B, d, L)
        rows = b("Gather", b("Reshape", "W", b.ints([0, -1])), idx, axis=0)  # (B, K, d)
        exact = b("Add", b("MatMul", rows, cols), b("Unsqueeze", bias, b.ints([2])))  # (B, K, L)
        b.stage = "fill"
        pred_shape = b("Shape", pred)
        flat_pred = b("Reshape", pred, b.ints([0, 0, -1]))  # (B, n, L)
        index = b("Expand", b("Unsqueeze", idx, b.ints([2])), b("Shape", exact))
        filled = b("ScatterElements", flat_pred, index, exact, axis=1)
        b("Reshape", filled, pred_shape, outputs=["Y"])
        channel_mask = _scatter_mask(b, channel_score, idx, axis=1)
        b("Expand", b("Unsqueeze", channel_mask, b.ints([2, 3])), pred_shape, outputs=["M"])
    else:
        rows = b("Gather", "W", idx, axis=0)  # (B, K, d)
        exact = b("Squeeze", b("MatMul", rows, b("Unsqueeze", "X", b.ints([2]))), b.ints([2]))
        b.stage = "fill"
        b("ScatterElements", pred, idx, b("Add", exact, bias), axis=1, outputs=["Y"])
        b("Identity", _scatter_mask(b, channel_score, idx, axis=1), outputs=["M"])


def _layer_attribute_names(conv: bool, granularity: str, int8: bool = False, lowering: str = "skip") -> list[str]:
    names = {"element": ["k"], "channel": ["k"], "nm": ["nm"], "threshold": ["threshold"]}[granularity]
    names += ["strides", "pads", "dilations"] if conv else []
    names += ["batch"] if conv and lowering == "grouped" and granularity == "channel" else []
    return names + (list(INT8_ATTRIBUTE_NAMES) if int8 else [])


def overload_form(
    op_type: str, granularity: str, kernel: Sequence[int] | None, lowering: str
) -> tuple[bool, tuple[int, ...] | None, str]:
    """Whether the op is a convolution, the kernel its body is specialised for and the lowering it really uses:
    one reading for the float and the int8 bodies."""
    if op_type not in LAYER_OPS:
        raise ValueError(f"{op_type!r} is not a NENNI layer op")
    conv = op_type == CONV
    kernel = tuple(int(v) for v in kernel) if kernel is not None and conv and granularity == "channel" else None
    lowering = lowering if granularity == "channel" else "skip"
    if lowering == "grouped" and not conv:
        lowering = "skip"  # a linear layer's skipping body is already one batched product per sample
    return conv, kernel, lowering


def layer_function(
    op_type: str,
    granularity: str,
    rank: str,
    opset: int,
    kernel: Sequence[int] | None = None,
    lowering: str = "skip",
) -> FunctionProto:
    """The model-local function implementing `op_type` for one overload (see `overload_name`)."""
    conv, kernel, lowering = overload_form(op_type, granularity, kernel, lowering)
    b = _Body()
    if granularity == "channel" and lowering == "masked":
        _masked_body(b, conv, granularity, rank)
        kernel = None
    elif granularity == "channel" and lowering == "grouped":
        _channel_grouped_body(b, rank)
        kernel = None
    elif granularity == "channel" and kernel is not None:
        _channel_conv_body(b, rank, kernel)
    elif granularity == "channel":
        _channel_body(b, conv, rank)
    else:
        _masked_body(b, conv, granularity, rank)
    return helper.make_function(
        DOMAIN,
        op_type,
        [name for name, _, _ in _LAYER_INPUTS],
        ["Y", "M"],
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=_layer_attribute_names(conv, granularity, lowering=lowering),
        doc_string=f"{op_type} ({granularity}, {rank} ranking) in standard ONNX ops",
        overload=overload_name(granularity, rank, kernel, lowering),
    )


def noise_function(opset: int) -> FunctionProto:
    b = _Body()
    b.stage = "noise"
    # scale=1 always: RandomNormalLike with scale 0 aborts ONNX Runtime; the std multiplies afterwards.
    draw = b("RandomNormalLike", "Y", mean=0.0, scale=1.0, refs={"seed": ("seed", AttributeProto.FLOAT)})
    std = b("Mul", b.ref("scale", "float"), b.ref("residual_rms", "float"))
    b("Where", "M", "Y", b("Add", "Y", b("Mul", draw, std)), outputs=["Z"])
    return helper.make_function(
        DOMAIN,
        NOISE,
        ["Y", "M"],
        ["Z"],
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=["scale", "residual_rms", "seed"],
        doc_string="NenniNoise (gaussian) in standard ONNX ops",
    )


def function_for_node(node: NodeProto, opset: int) -> FunctionProto:
    """The function body a NENNI node calls (its op type and, for layers, its overload)."""
    if node.op_type == NOISE:
        return noise_function(opset)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    granularity = _text(attrs.get("granularity"))
    rank = _text(attrs.get("rank", b"signed"))
    overload = node.overload
    kernel, lowering = kernel_of_overload(overload), lowering_of_overload(overload)
    if is_int8_overload(overload):
        from .ops_int8 import layer_function_int8

        return layer_function_int8(node.op_type, granularity, rank, opset, kernel, lowering)
    return layer_function(node.op_type, granularity, rank, opset, kernel, lowering)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


register_schemas()
