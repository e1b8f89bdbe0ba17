"""Load an ONNX file defensively: a clear NenniError for every way it can be wrong before ONNX Runtime sees it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto, helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

from ..errors import NenniError, first_line
from ..exporters import ops

_MAX_BYTES = 2**31 - 1  # protobuf's limit for one message


@dataclass
class InputSpec:
    name: str
    elem_type: int
    shape: list[int | str | None]  # None or a name where the dimension is dynamic

    @property
    def dtype_name(self) -> str:
        return helper.tensor_dtype_to_np_dtype(self.elem_type).name if self.elem_type else "undefined"


@dataclass
class LoadedModel:
    """A checked model: the proto with its external data loaded, what it is, and how to feed it."""

    path: Path | None
    proto: ModelProto
    metadata: dict[str, str]
    inputs: list[InputSpec]
    outputs: list[str]
    nenni_nodes: int = 0
    noise_nodes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def is_nenni(self) -> bool:
        return self.nenni_nodes > 0

    @property
    def target(self) -> str:
        return self.metadata.get("nenni.target", "ort")

    @property
    def seeded(self) -> bool:
        return bool(self.metadata.get("nenni.noise_seed"))

    def config(self) -> dict:
        try:
            return json.loads(self.metadata.get("nenni.config", "{}"))
        except json.JSONDecodeError:
            return {}


def load_onnx_checked(path: str | os.PathLike, *, require_functions: bool = True) -> LoadedModel:
    """Read, validate and check `path`; refuse corrupt or truncated files, external data outside the model's
    folder, unknown `ai.nenni` versions and NENNI nodes without a function body (when `require_functions`:
    stock ONNX Runtime runs them only by inlining the body)."""
    path = Path(path)
    proto = _read(path)
    _check_external_data(proto, path.parent)
    try:
        load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError) as exc:
        raise NenniError(f"{path}: cannot read its external data ({exc})") from None
    return check_proto(proto, path=path, require_functions=require_functions)


def check_proto(proto: ModelProto, *, path: Path | None = None, require_functions: bool = True) -> LoadedModel:
    """The checks of `load_onnx_checked` on an in-memory model (external data already loaded)."""
    where = str(path) if path else "the model"
    if not proto.graph.node or not proto.graph.output:
        raise NenniError(f"{where} has an empty graph (corrupt or truncated ONNX)")
    _check_domains(proto, where)
    counts = _check_nenni_nodes(proto, where, require_functions)
    ops.register_schemas()
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise NenniError(f"{where} fails the ONNX checker (corrupt, truncated or invalid): {first_line(exc)}") from None
    inputs = _graph_inputs(proto)
    if not inputs:
        raise NenniError(f"{where} has no graph input")
    return LoadedModel(
        path=path,
        proto=proto,
        metadata={p.key: p.value for p in proto.metadata_props},
        inputs=inputs,
        outputs=[o.name for o in proto.graph.output],
        nenni_nodes=counts[0],
        noise_nodes=counts[1],
    )


def _read(path: Path) -> ModelProto:
    if not path.exists():
        raise NenniError(f"{path}: no such file")
    if not path.is_file():
        raise NenniError(f"{path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise NenniError(f"{path} is empty (0 bytes): not an ONNX model")
    if size > _MAX_BYTES:
        raise NenniError(f"{path} is larger than 2 GB: export with external data")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise NenniError(f"{path} is not a valid ONNX model (corrupt or truncated): {first_line(exc)}") from None
    except OSError as exc:
        raise NenniError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not proto.HasField("graph"):
        raise NenniError(f"{path} is not a valid ONNX model (no graph: corrupt or truncated)")
    return proto


def _external_tensors(proto: ModelProto) -> list[TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(proto) if t.data_location == TensorProto.EXTERNAL]


def _check_external_data(proto: ModelProto, folder: Path) -> None:
    """Every external-data reference must stay inside the model's folder, exist, and be long enough."""
    base = folder.resolve()
    for tensor in _external_tensors(proto):
        info = ExternalDataInfo(tensor)
        location = info.location
        if not location or os.path.isabs(location):
            raise NenniError(f"initializer {tensor.name!r}: external data path {location!r} must be relative")
        target = (base / location).resolve()
        if base != target.parent and base not in target.parents:
            raise NenniError(
                f"initializer {tensor.name!r}: external data {location!r} points outside the model's folder (refused)"
            )
        if not target.is_file():
            raise NenniError(f"initializer {tensor.name!r}: external data file {location!r} is missing")
        end = (info.offset or 0) + (info.length or 0)
        if end > target.stat().st_size:
            raise NenniError(f"initializer {tensor.name!r}: external data file {location!r} is truncated")


def _check_domains(proto: ModelProto, where: str) -> None:
    for opset in proto.opset_import:
        if opset.domain == ops.DOMAIN and opset.version not in ops.SUPPORTED_DOMAIN_VERSIONS:
            supported = ", ".join(map(str, ops.SUPPORTED_DOMAIN_VERSIONS))
            raise NenniError(
                f"{where} uses {ops.DOMAIN} version {opset.version}; this nenni-deploy supports version {supported}"
            )


def _check_nenni_nodes(proto: ModelProto, where: str, require_functions: bool) -> tuple[int, int]:
    functions = {(f.domain, f.name, f.overload) for f in proto.functions}
    layers = noise = 0
    for node in proto.graph.node:
        if node.domain != ops.DOMAIN:
            continue
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.op_type not in ops.ALL_OPS:
            raise NenniError(f"{where}: unknown {ops.DOMAIN} op {node.op_type!r}")
        _check_attributes(node, label, where)
        if node.op_type == ops.NOISE:
            noise += 1
        else:
            layers += 1
        if require_functions and (node.domain, node.op_type, node.overload) not in functions:
            if any(a.name in ops.PLUGIN_ATTRIBUTES for a in node.attribute):
                raise NenniError(
                    f"{where} is a TensorRT-target export ({label} is a plugin with no function body): "
                    "ONNX Runtime cannot run it; export with --target ort"
                )
            raise NenniError(f"{where}: {label} has no function body (missing model-local function)")
    return layers, noise


def _check_attributes(node, label: str, where: str) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    if node.op_type == ops.NOISE:
        if text.get("mode", "gaussian") not in ops.NOISE_MODES:
            raise NenniError(f"{where}: {label} has unknown noise mode {text.get('mode')!r}")
        return
    if text.get("granularity") not in ops.GRANULARITIES:
        raise NenniError(f"{where}: {label} has unknown granularity {text.get('granularity')!r}")
    if text.get("rank", "signed") not in ops.RANKS:
        raise NenniError(f"{where}: {label} has unknown rank {text.get('rank')!r}")


def _graph_inputs(proto: ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in initializers:
            continue
        tensor = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        specs.append(InputSpec(vi.name, tensor.elem_type, shape))
    return specs
