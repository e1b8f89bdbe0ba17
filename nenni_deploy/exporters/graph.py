"""Passes over an exported ModelProto: target shaping, naming, documentation, metadata, checks, atomic save."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import ModelProto, NodeProto, helper, numpy_helper

from .. import __version__
from ..errors import NenniError, first_line
from ..files import current_umask, staging_dir
from . import ops

FORMAT = "nenni-onnx"
FORMAT_VERSION = "1"
OVERLOAD_IR_VERSION = 10  # function overloads need ONNX IR 10
INPUT_DOC = "images: float32 [batch, {c}, {h}, {w}], NCHW pixels in [0, 1]; the normalisation is inside the graph"
OUTPUT_DOC = "logits: float32 [batch, classes], unnormalised class scores (argmax = prediction)"


def nenni_nodes(proto: ModelProto, op_types: tuple[str, ...] = ops.ALL_OPS) -> list[NodeProto]:
    return [n for n in proto.graph.node if n.domain == ops.DOMAIN and n.op_type in op_types]


def _consumed(proto: ModelProto) -> set[str]:
    used = {name for node in proto.graph.node for name in node.input}
    return used | {o.name for o in proto.graph.output}


def trim_unused_outputs(proto: ModelProto) -> None:
    """Drop the optional mask output of layer nodes nobody reads (the exporter always emits both)."""
    used = _consumed(proto)
    dropped = set()
    for node in nenni_nodes(proto, ops.LAYER_OPS):
        for i in range(1, len(node.output)):
            if node.output[i] and node.output[i] not in used:
                dropped.add(node.output[i])
                node.output[i] = ""
    keep = [vi for vi in proto.graph.value_info if vi.name not in dropped]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)


def name_nenni_nodes(proto: ModelProto) -> None:
    """Name each layer node after its PyTorch module (from its weight's initializer name), and its values
    `<layer>.y`, `<layer>.mask`, `<layer>.noisy`: readable in Netron instead of the exporter's `getitem_12`."""
    taken = {n.name for n in proto.graph.node}
    producers = {out: node for node in proto.graph.node for out in node.output if out}
    renames: dict[str, str] = {}
    for node in nenni_nodes(proto, ops.LAYER_OPS):
        weight = node.input[1]
        if weight.endswith(".weight") and weight[: -len(".weight")] not in taken:
            node.name = weight[: -len(".weight")]
            taken.add(node.name)
            for out, suffix in zip(node.output, (".y", ".mask"), strict=False):
                if out:
                    renames[out] = node.name + suffix
    for node in nenni_nodes(proto, (ops.NOISE,)):
        layer = producers.get(node.input[0])
        if layer is not None and layer.name in taken and layer.op_type in ops.LAYER_OPS:
            node.name = f"{layer.name}.noise"
            renames[node.output[0]] = f"{layer.name}.noisy"
    _rename_values(proto, renames)


def _rename_values(proto: ModelProto, renames: dict[str, str]) -> None:
    """Rename intermediate values everywhere they appear; graph inputs and outputs keep their names."""
    fixed = {v.name for v in proto.graph.input} | {v.name for v in proto.graph.output}
    existing = {out for node in proto.graph.node for out in node.output} | {t.name for t in proto.graph.initializer}
    renames = {old: new for old, new in renames.items() if old not in fixed and new not in existing}
    if not renames:
        return
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = renames.get(name, name)
    for vi in proto.graph.value_info:
        vi.name = renames.get(vi.name, vi.name)


def node_attr(node: NodeProto, name: str, default=None):
    """A node attribute's value (strings decoded), or `default`."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def layer_overload(node: NodeProto, proto: ModelProto | None = None, lowering: str = "skip") -> str:
    """The node's function overload; channel convolutions get the kernel-specific body when the weight is an
    initializer of known shape."""
    kernel = None
    if proto is not None and node.op_type == ops.CONV:
        weight = next((t for t in proto.graph.initializer if t.name == node.input[1]), None)
        if weight is not None and len(weight.dims) == 4:
            kernel = tuple(weight.dims[2:])
    int8 = node_attr(node, "x_scale") is not None  # the int8 form's calibrated attributes (exporters/int8.py)
    if node.op_type != ops.CONV and lowering in ops.STATIC_BATCH_LOWERINGS:
        lowering = "skip"  # a linear layer's skipping body is already one batched product per sample
    return ops.overload_name(
        node_attr(node, "granularity"), node_attr(node, "rank", "signed"), kernel, lowering, int8=int8
    )


def static_batch(proto: ModelProto, why: str = "") -> int:
    """The graph input's fixed batch size; a NenniError for a dynamic batch axis."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:
        reason = f" ({why})" if why else ""
        raise NenniError(f"the grouped channel lowering needs a static batch size: export with --batch N{reason}")
    return int(dims[0].dim_value)


def model_opset(proto: ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def attach_functions(proto: ModelProto, lowerings: dict[str, str] | None = None) -> None:
    """ORT form: every NENNI node names its body (overload) and the model carries exactly the bodies it calls."""
    opset = model_opset(proto)
    for node in nenni_nodes(proto):
        _remove_attrs(node, ops.PLUGIN_ATTRIBUTES)
        if node.op_type == ops.NOISE and node_attr(node, "seed", 0.0) < 0:
            _remove_attrs(node, ("seed",))  # the TensorRT form's "unseeded" marker; ORT seeds itself without one
        lowering = (lowerings or {}).get(node.name, "skip")
        node.overload = layer_overload(node, proto, lowering) if node.op_type in ops.LAYER_OPS else ""
        _remove_attrs(node, ("batch",))
        if ops.lowering_of_overload(node.overload) in ops.STATIC_BATCH_LOWERINGS:
            node.attribute.append(helper.make_attribute("batch", static_batch(proto, node.name)))
    _drop_nenni_functions(proto)
    seen: dict[tuple[str, str], NodeProto] = {}
    for node in nenni_nodes(proto):
        seen.setdefault((node.op_type, node.overload), node)
    proto.functions.extend(ops.function_for_node(node, opset) for node in seen.values())
    if seen:
        proto.ir_version = max(proto.ir_version, OVERLOAD_IR_VERSION)


def mark_plugins(proto: ModelProto) -> None:
    """TensorRT form: plugin attributes on every NENNI node and no local function of the same name, because
    TensorRT's parser resolves a local function before a plugin. Noise nodes always carry `seed` (the plugin's
    attribute list is fixed; `ops.UNSEEDED` stands for none)."""
    for node in nenni_nodes(proto):
        _remove_attrs(node, ops.PLUGIN_ATTRIBUTES)
        node.attribute.extend(
            [
                helper.make_attribute("plugin_namespace", ops.PLUGIN_NAMESPACE),
                helper.make_attribute("plugin_version", ops.PLUGIN_VERSION),
            ]
        )
        if node.op_type == ops.NOISE and node_attr(node, "seed") is None:
            node.attribute.append(helper.make_attribute("seed", ops.UNSEEDED))
        node.overload = ""
    _drop_nenni_functions(proto)


def _remove_attrs(node: NodeProto, names: tuple[str, ...]) -> None:
    keep = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(keep)


def _drop_nenni_functions(proto: ModelProto) -> None:
    keep = [f for f in proto.functions if not (f.domain == ops.DOMAIN and f.name in ops.ALL_OPS)]
    del proto.functions[:]
    proto.functions.extend(keep)


def shape_for_target(proto: ModelProto, target: str, opset: int, lowerings: dict[str, str] | None = None) -> None:
    """`lowerings` maps NENNI node names to a channel lowering ("skip" unless named)."""
    if model_opset(proto) != opset:
        raise NenniError(f"the exporter wrote opset {model_opset(proto)} instead of {opset}")
    if target == "ort":
        attach_functions(proto, lowerings)
    elif target == "tensorrt":
        mark_plugins(proto)
    else:
        raise NenniError(f"unknown target {target!r}")


def to_ort_form(proto: ModelProto) -> ModelProto:
    """A copy that ONNX Runtime can run (bodies attached): e.g. to check a TensorRT-target export on CPU."""
    copy = ModelProto()
    copy.CopyFrom(proto)
    attach_functions(copy)
    return copy


def document_io(proto: ModelProto, input_shape: tuple[int, ...]) -> None:
    c, h, w = input_shape
    proto.graph.input[0].doc_string = INPUT_DOC.format(c=c, h=h, w=w)
    proto.graph.output[0].doc_string = OUTPUT_DOC
    proto.producer_name = "nenni-deploy"
    proto.producer_version = __version__
    proto.graph.name = "nenni"


# -- metadata ---------------------------------------------------------------------------------------------------
def initializer_sha256(proto: ModelProto) -> str:
    """One hash over the graph's initializers (name, type, shape, values): the exported weights themselves."""
    h = hashlib.sha256()
    for init in sorted(proto.graph.initializer, key=lambda t: t.name):
        array = numpy_helper.to_array(init)
        h.update(f"{init.name}|{array.dtype}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def metadata_for(card: dict[str, Any], options, proto: ModelProto) -> dict[str, str]:
    cfg = card.get("nenni") or {}
    data = card.get("data") or {}
    model = card.get("model") or {}
    noisy = bool(nenni_nodes(proto, (ops.NOISE,)))
    layers = [] if options.dense else card.get("layers", [])
    return {
        "nenni.format": FORMAT,
        "nenni.format_version": FORMAT_VERSION,
        "nenni.domain": ops.DOMAIN,
        "nenni.domain_version": str(ops.DOMAIN_VERSION),
        "nenni.target": options.target,
        "nenni.dense": json.dumps(bool(options.dense)),
        "nenni.precision": "float32",  # exporters/int8.py: "int8"
        "nenni.kind": "dense" if options.dense else str(card.get("kind", "dense")),
        "nenni.arch": str(card.get("arch", "")),
        "nenni.dataset": str(data.get("name") or card.get("metrics", {}).get("data") or ""),
        "nenni.data": json.dumps(data, sort_keys=True),
        "nenni.model": json.dumps(model, sort_keys=True),
        "nenni.config": json.dumps(cfg, sort_keys=True),
        "nenni.layers": json.dumps(layers, sort_keys=True),
        "nenni.noise": "gaussian" if noisy else "none",
        "nenni.noise_seed": "" if options.noise_seed is None or not noisy else str(options.noise_seed),
        "nenni.weights_sha256": str(card.get("weights_sha256") or ""),
        "nenni.base_weights_sha256": str(card.get("base_weights_sha256") or ""),
        "nenni.projection_sha256": str(card.get("projection_sha256") or ""),
        "nenni.onnx_weights_sha256": initializer_sha256(proto),
        "nenni.input": INPUT_DOC.split(":")[0],
        "nenni.output": OUTPUT_DOC.split(":")[0],
        "nenni_deploy.version": __version__,
        "torch.version": torch.__version__,
        "onnx.version": onnx.__version__,
    }


def set_metadata(proto: ModelProto, values: dict[str, str]) -> None:
    del proto.metadata_props[:]
    helper.set_model_props(proto, values)


def read_metadata(proto: ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


# -- checks and statistics --------------------------------------------------------------------------------------
def check(proto: ModelProto) -> None:
    """The full ONNX checker (with strict shape inference through the registered schemas) and no dead nodes."""
    ops.register_schemas()
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise NenniError(f"the exported model fails the ONNX checker: {first_line(exc)}") from None
    dead = dead_nodes(proto)
    if dead:
        raise NenniError(f"the exported model has {len(dead)} dead nodes, e.g. {dead[0]}")


def dead_nodes(proto: ModelProto) -> list[str]:
    """Nodes none of whose outputs reach a consumer or a graph output."""
    used = _consumed(proto)
    return [n.name or n.op_type for n in proto.graph.node if not any(o in used for o in n.output if o)]


def node_counts(proto: ModelProto) -> dict[str, Any]:
    by_op = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in proto.graph.node
    )
    return {
        "nodes": len(proto.graph.node),
        "nenni_layers": len(nenni_nodes(proto, ops.LAYER_OPS)),
        "nenni_noise": len(nenni_nodes(proto, (ops.NOISE,))),
        "functions": len(proto.functions),
        "initializers": len(proto.graph.initializer),
        "parameters": int(sum(numpy_helper.to_array(t).size for t in proto.graph.initializer)),
        "by_op": dict(sorted(by_op.items())),
    }


# -- saving -----------------------------------------------------------------------------------------------------
def data_file_name(out: Path) -> str:
    return out.name + ".data"


def save_model_atomic(proto: ModelProto, out: str | os.PathLike, *, external_data: bool = False) -> list[Path]:
    """Write into a temporary folder beside `out`, then rename into place: a failure leaves no half-written file.

    With external data the weights go to `<out>.data` beside the model (location relative to its folder).
    Returns the written paths.
    """
    out = Path(out)
    if out.is_dir():
        raise NenniError(f"cannot write {out}: it is a directory")
    tmp = staging_dir(out)
    try:
        written = []
        if external_data:
            copy = ModelProto()
            copy.CopyFrom(proto)
            data_name = data_file_name(out)
            onnx.save_model(
                copy,
                str(tmp / out.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            if (tmp / data_name).exists():
                os.replace(tmp / data_name, out.parent / data_name)
                written.append(out.parent / data_name)
        else:
            onnx.save_model(proto, str(tmp / out.name))
        os.replace(tmp / out.name, out)
        written.insert(0, out)
        for path in written:  # staged files are private; the finished model gets the usual permissions
            path.chmod(0o666 & ~current_umask())
        return written
    except OSError as exc:
        raise NenniError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- in-memory variants for checking ----------------------------------------------------------------------------
def _copy(proto: ModelProto) -> ModelProto:
    copy = ModelProto()
    copy.CopyFrom(proto)
    return copy


def without_noise(proto: ModelProto) -> ModelProto:
    """A copy with every NenniNoise replaced by an Identity: the deterministic part of a noise model."""
    copy = _copy(proto)
    for node in nenni_nodes(copy, (ops.NOISE,)):
        y, z = node.input[0], node.output[0]
        node.Clear()
        node.CopyFrom(helper.make_node("Identity", [y], [z], name=f"no_noise_{z}"))
    trim_unused_outputs(copy)
    keep = [f for f in copy.functions if not (f.domain == ops.DOMAIN and f.name == ops.NOISE)]
    del copy.functions[:]
    copy.functions.extend(keep)
    return copy


def with_noise_seed(proto: ModelProto, seed: int | None) -> ModelProto:
    """A copy whose NenniNoise nodes carry per-layer seeds derived from `seed` (None: no seed, fresh noise)."""
    copy = _copy(proto)
    for index, node in enumerate(nenni_nodes(copy, (ops.NOISE,))):
        _remove_attrs(node, ("seed",))
        if seed is not None:
            node.attribute.append(helper.make_attribute("seed", float(ops.layer_seed_for_noise(seed, index))))
    return copy


def expose_noise(proto: ModelProto) -> tuple[ModelProto, list[dict[str, Any]]]:
    """A copy that also outputs every NenniNoise node's input, mask and output, to measure the noise it adds.

    Returns the copy and one record per noise node (names of the three values, expected standard deviation).
    """
    copy = _copy(proto)
    producers = {out: node for node in copy.graph.node for out in node.output}
    records = []
    for node in nenni_nodes(copy, (ops.NOISE,)):
        layer = producers.get(node.input[0])
        rank = 4 if layer is not None and layer.op_type == ops.CONV else 2
        y, m, z = node.input[0], node.input[1], node.output[0]
        for name, elem in ((y, onnx.TensorProto.FLOAT), (m, onnx.TensorProto.BOOL), (z, onnx.TensorProto.FLOAT)):
            copy.graph.output.append(helper.make_tensor_value_info(name, elem, [None] * rank))
        records.append(
            {
                "layer": layer.name if layer is not None else node.name,
                "values": (y, m, z),
                "expected_std": float(node_attr(node, "scale", 1.0)) * float(node_attr(node, "residual_rms", 0.0)),
            }
        )
    return copy, records


def ort_optimized(
    model: ModelProto | str | os.PathLike, *, all_optimizations: bool = False, what: str = "the model"
) -> ModelProto:
    """`model` as ONNX Runtime's CPU provider runs it after its graph optimizations: extended (function bodies
    inlined, QDQ groups fused into integer kernels), or all (also the hardware-specific blocked NCHWc layout)."""
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, ModelProto) else os.fspath(model)
    with tempfile.TemporaryDirectory(prefix="nenni-ort-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        level = ort.GraphOptimizationLevel
        options.graph_optimization_level = level.ORT_ENABLE_ALL if all_optimizations else level.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        options.log_severity_level = 3  # the "hardware-specific optimized model" warning is expected
        options.intra_op_num_threads = 1
        try:
            ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several types; the user needs one line
            raise NenniError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from None
        return onnx.load(path, load_external_data=False)
