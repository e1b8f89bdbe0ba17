"""Static post-training int8 quantization of an exported model (`nenni export --int8`).

One calibration pass, two consumers:
- the standard operators (the stem and classifier, dense layers, residual adds, the whole dense model) go
  through `onnxruntime.quantization.quantize_static` to a QDQ graph: int8 weights per output channel, uint8
  activations, which ONNX Runtime fuses into its integer kernels (QLinearConv, QGemm, QLinearAdd, ...);
- the NENNI layers get their int8 form (exporters/ops_int8.py): the node keeps its inputs and outputs and gains
  calibrated scales and zero points for its input X, its projection P x and (bodies that compute the exact
  layer densely) its exact output, which select an integer body.

Calibration runs ONNX Runtime's calibrators (min-max, percentile or entropy) once, on a copy of the float model
to which every NENNI node adds its projection and exact output as side outputs, so that the ranges of values
inside the NENNI bodies come from the same calibrator and the same images as the rest. Pre-processing
(`quant_pre_process`) runs in full on dense graphs; on NENNI graphs without its ORT optimization step, which
would inline (and so remove) the NENNI nodes.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper

from ..errors import NenniError
from . import graph, ops
from .ops_int8 import computes_densely

CALIB_METHODS = ("minmax", "percentile", "entropy")
METADATA_KEY = "nenni.int8"
PRECISION_KEY = "nenni.precision"

# What ONNX Runtime runs on integers once it has fused the QDQ groups (CPU provider, extended optimizations).
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "ConvInteger",
        "QLinearAdd",
        "QLinearMul",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearReduceMean",
    }
)
# Float kernels that carry a layer's multiply-accumulates.
FLOAT_COMPUTE_KERNELS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose"})


@dataclass
class Int8Settings:
    calib_n: int = 256  # calibration images
    calib_method: str = "minmax"  # minmax | percentile | entropy (ONNX Runtime's calibrators)
    percentile: float = 99.999  # for calib_method percentile
    per_channel: bool = True  # int8 weights per output channel (dense operators; NENNI filters always are)
    # Dense weights at 7 bits: ORT's advice on x86 CPUs without VNNI, whose u8 x s8 kernels can saturate.
    # None: decide from this machine's CPU flags. The NENNI bodies use u8 x u8 kernels, which do not saturate.
    reduce_range: bool | None = None
    batch_size: int = 32  # calibration batch
    nenni: bool = True  # False: leave the NENNI layers in float (quantize only the operators around them)

    def validate(self) -> None:
        if self.calib_n < 1:
            raise NenniError(f"--calib-n must be >= 1, got {self.calib_n}")
        if self.calib_method not in CALIB_METHODS:
            raise NenniError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {self.calib_method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise NenniError(f"--calib-percentile must be in (50, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise NenniError(f"calibration batch size must be >= 1, got {self.batch_size}")

    def resolved_reduce_range(self) -> bool:
        return (not cpu_has_vnni()) if self.reduce_range is None else bool(self.reduce_range)


@dataclass
class Int8Result:
    proto: ModelProto
    settings: Int8Settings
    calibration: dict[str, Any]  # images, source, method, ranges of the NENNI layers
    counts: dict[str, Any]  # what runs on integers (see `integer_op_counts`)
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "calibration": self.calibration,
            "counts": self.counts,
            "seconds": self.seconds,
            "warnings": self.warnings,
        }


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX-512 VNNI or AVX-VNNI), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return False


def is_int8(proto_or_metadata: ModelProto | dict[str, str]) -> bool:
    meta = graph.read_metadata(proto_or_metadata) if isinstance(proto_or_metadata, ModelProto) else proto_or_metadata
    return meta.get(PRECISION_KEY) == "int8"


# -- calibration ------------------------------------------------------------------------------------------------
def check_calibration_images(images: np.ndarray, proto: ModelProto) -> np.ndarray:
    """float32 NCHW images of the model's input shape, in [0, 1]; a NenniError naming the mismatch otherwise."""
    images = np.asarray(images)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    want = [d.dim_value if d.HasField("dim_value") else None for d in dims][1:]
    got = list(images.shape[1:])
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
        raise NenniError(
            f"calibration images have shape {list(images.shape[1:])} per image, the model takes "
            f"{[w if w is not None else '?' for w in want]}"
        )
    if len(images) == 0:
        raise NenniError("no calibration images")
    if images.dtype != np.float32:
        images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise NenniError("calibration images contain NaN or Inf values")
    return np.ascontiguousarray(images)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over an array, in fixed batches."""

    def __init__(self, name: str, images: np.ndarray, batch_size: int) -> None:
        self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self.name = name
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class _Probe:
    """Names of the values calibrated for one NENNI layer node."""

    node: str
    x: str
    u: str
    y: str


def _probe_names(node: NodeProto) -> _Probe:
    return _Probe(node.name, node.input[0], f"{node.name}.calib_u", f"{node.name}.calib_y")


def probe_model(proto: ModelProto) -> tuple[ModelProto, list[_Probe]]:
    """A copy of the float model whose NENNI layer nodes also output (as side branches of standard ops) the
    values their int8 bodies quantize: the projection P x and the exact output W x + b."""
    probe = ModelProto()
    probe.CopyFrom(proto)
    probes = []
    for node in graph.nenni_nodes(probe, ops.LAYER_OPS):
        p = _probe_names(node)
        x, w, b, proj = node.input[:4]
        if node.op_type == ops.CONV:
            geometry = {
                "strides": graph.node_attr(node, "strides", [1, 1]),
                "pads": graph.node_attr(node, "pads", [0, 0, 0, 0]),
                "dilations": graph.node_attr(node, "dilations", [1, 1]),
            }
            probe.graph.node.extend(
                [
                    helper.make_node("Conv", [x, proj], [p.u], name=f"{p.u}_node", **geometry),
                    helper.make_node("Conv", [x, w, b], [p.y], name=f"{p.y}_node", **geometry),
                ]
            )
            rank = 4
        else:
            probe.graph.node.extend(
                [
                    helper.make_node("Gemm", [x, proj], [p.u], name=f"{p.u}_node", transB=1),
                    helper.make_node("Gemm", [x, w, b], [p.y], name=f"{p.y}_node", transB=1),
                ]
            )
            rank = 2
        for name in (p.u, p.y):
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank))
        probes.append(p)
    return probe, probes


def _calibrator_options(settings: Int8Settings) -> dict[str, Any]:
    # Activations are asymmetric uint8: ranges are not symmetrized (the percentile calibrator would by default).
    options: dict[str, Any] = {"symmetric": False}
    if settings.calib_method == "percentile":
        options["percentile"] = settings.percentile
    if settings.calib_method == "entropy":
        # ORT's defaults (128 histogram bins, 128 quantized bins) leave the search a single candidate, the full
        # range: min-max under another name. 512 bins over [-max, max] give it 193 candidates (1024 took twice
        # as long for the same ranges on ResNet-20).
        options.update(num_bins=512, num_quantized_bins=128)
    return options


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]  # fmt: skip


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs advice through the root logger and its histogram calibrators print
    progress to stdout: library code is quiet."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def calibrate(proto: ModelProto, images: np.ndarray, settings: Int8Settings, folder: Path):
    """Ranges of every activation the quantized graph needs (onnxruntime TensorsData) and the NENNI probes."""
    from onnxruntime.quantization.calibrate import create_calibrator

    probe, probes = probe_model(proto)
    probe_path = folder / "probe.onnx"
    onnx.save_model(probe, str(probe_path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
    if fixed:  # a static-batch graph calibrates on whole batches of its size (images repeated to fill one)
        images = np.concatenate([images] * -(-fixed // len(images)))[: max(fixed, len(images) // fixed * fixed)]
    reader = _Reader(proto.graph.input[0].name, images, fixed or settings.batch_size)
    try:
        calibrator = create_calibrator(
            probe_path,
            None,  # every float tensor: the standard operators' and the NENNI probes'
            augmented_model_path=str(folder / "augmented.onnx"),
            calibrate_method=_method(settings.calib_method),
            extra_options=_calibrator_options(settings),
        )
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    except NenniError:
        raise
    except Exception as exc:  # ORT raises from C++ and the calibrators raise plain ValueErrors
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NenniError(f"int8 calibration failed: {text}") from None
    return ranges, probes


def _uint8_params(ranges, name: str) -> tuple[float, int]:
    """(scale, zero point) of a uint8 asymmetric quantization of `name`'s calibrated range (ORT's rule)."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    if name not in ranges.data:
        raise NenniError(f"int8 calibration recorded no range for {name!r}")
    low, high = (float(np.asarray(v).reshape(-1)[0]) for v in ranges.data[name].range_value)
    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.UINT8)
    zero, scale = compute_scale_zp(np.float32(low), np.float32(high), qmin, qmax, symmetric=False)
    scale = float(scale)
    if not (scale > 0 and np.isfinite(scale)):  # a constant tensor (e.g. all zeros): any positive scale works
        scale = 1.0
    return scale, int(zero)


# -- quantization -----------------------------------------------------------------------------------------------
def _pre_process(proto: ModelProto, folder: Path, nenni: bool) -> tuple[ModelProto, str]:
    """onnxruntime's quant_pre_process: in full for dense graphs; without its ORT optimization step for NENNI
    graphs (it inlines the model-local functions, which would remove the NENNI nodes)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = folder / "float.onnx", folder / "pre.onnx"
    onnx.save_model(proto, str(src))
    try:
        quant_pre_process(str(src), str(dst), skip_optimization=nenni)
        mode = "shape inference (symbolic and ONNX)" if nenni else "ORT basic optimization and shape inference"
        return onnx.load(str(dst)), mode
    except Exception as exc:  # a pre-processing failure only costs the advice, not the quantization
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return proto, f"skipped ({text})"


def _quantize_standard_ops(proto: ModelProto, ranges, settings: Int8Settings, folder: Path) -> ModelProto:
    """quantize_static (QDQ) over the standard operators, with the ranges already calibrated."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    src, dst, cache = folder / "to_quantize.onnx", folder / "qdq.onnx", folder / "ranges.json"
    onnx.save_model(proto, str(src))
    save_tensors_data(ranges, cache)
    try:
        quantize_static(
            str(src),
            str(dst),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.resolved_reduce_range(),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_method(settings.calib_method),
            calibration_cache_path=str(cache),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NenniError(f"onnxruntime quantize_static failed: {text}") from None
    return onnx.load(str(dst))


def _set_int8_attributes(node: NodeProto, values: dict[str, float | int]) -> None:
    keep = [a for a in node.attribute if a.name not in ops.INT8_ATTRIBUTE_NAMES]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in values.items())


def quantize_int8(
    proto: ModelProto,
    images: np.ndarray,
    settings: Int8Settings,
    *,
    source: str = "",
    approx_bits: dict[str, int] | None = None,
) -> Int8Result:
    """The int8 form of an ORT-target export (dense or NENNI, as `exporters.export.build_onnx` returns it).

    `images` are the calibration images (float32 NCHW in [0, 1], the model's input shape); `approx_bits` maps
    NENNI node names to their approximator's bit width (default 8; more than 8 is quantized at 8).
    """
    start = time.perf_counter()
    settings.validate()
    metadata = graph.read_metadata(proto)
    if metadata.get("nenni.target", "ort") != "ort":
        raise NenniError("--int8 exports for ONNX Runtime only (--target ort): TensorRT builds its own int8 engines")
    if is_int8(metadata):
        raise NenniError("the model is already an int8 export")
    images = check_calibration_images(images, proto)[: settings.calib_n]
    nenni = bool(graph.nenni_nodes(proto, ops.LAYER_OPS))
    warnings = []
    with tempfile.TemporaryDirectory(prefix="nenni-int8-") as tmp, _quiet_quantizer():
        folder = Path(tmp)
        pre, pre_mode = _pre_process(proto, folder, nenni)
        ranges, probes = calibrate(pre, images, settings, folder)
        quantized = _quantize_standard_ops(pre, ranges, settings, folder)
    layers = []
    if settings.nenni:
        by_name = {n.name: n for n in graph.nenni_nodes(quantized, ops.LAYER_OPS)}
        for p in probes:
            node = by_name[p.node]
            bits = min(int((approx_bits or {}).get(p.node, 8)), 8)
            xs, xz = _uint8_params(ranges, p.x)
            us, uz = _uint8_params(ranges, p.u)
            ys, yz = _uint8_params(ranges, p.y)
            values = dict(x_scale=xs, x_zero_point=xz, u_scale=us, u_zero_point=uz, y_scale=ys, y_zero_point=yz)
            dense_kernel = computes_densely(node.op_type, node.overload)
            w_bits = 7 if dense_kernel and settings.resolved_reduce_range() else 8
            _set_int8_attributes(node, {**values, "w_bits": w_bits, "approx_bits": bits})
            layers.append({"layer": p.node, **values, "w_bits": w_bits, "approx_bits": bits})
            if int((approx_bits or {}).get(p.node, 8)) > 8:
                warnings.append(f"{p.node}: approximator at {(approx_bits or {})[p.node]} bits runs at 8")
    lowerings = {n.name: ops.lowering_of_overload(n.overload) for n in graph.nenni_nodes(quantized, ops.LAYER_OPS)}
    graph.attach_functions(quantized, lowerings)
    calibration = {
        "images": int(len(images)),
        "source": source,
        "method": settings.calib_method,
        "percentile": settings.percentile if settings.calib_method == "percentile" else None,
        "pre_process": pre_mode,
        "activations": "uint8, asymmetric, per tensor",
        "weights": (
            f"int8, symmetric, per {'output channel' if settings.per_channel else 'tensor'}"
            f"{', 7-bit range' if settings.resolved_reduce_range() else ''} (standard ops); "
            "int8 symmetric per filter (NENNI exact path), ternary projection, approximator at its bits"
        ),
        "reduce_range": settings.resolved_reduce_range(),
        "cpu_vnni": cpu_has_vnni(),
        "nenni_layers": layers,
    }
    metadata.update(
        {
            PRECISION_KEY: "int8",
            METADATA_KEY: json.dumps({k: v for k, v in calibration.items() if k != "nenni_layers"}, sort_keys=True),
            "nenni.onnx_weights_sha256": graph.initializer_sha256(quantized),
            "nenni.overloads": json.dumps({n.name: n.overload for n in graph.nenni_nodes(quantized, ops.LAYER_OPS)}),
            "onnxruntime.version": _ort_version(),
        }
    )
    graph.set_metadata(quantized, metadata)
    graph.check(quantized)
    counts = integer_op_counts(quantized)
    return Int8Result(quantized, settings, calibration, counts, time.perf_counter() - start, warnings)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


# -- what runs on integers --------------------------------------------------------------------------------------
def optimized_nodes(proto: ModelProto) -> list[NodeProto]:
    """The nodes ONNX Runtime runs for `proto` on the CPU provider after its extended optimizations (function
    bodies inlined, QDQ groups fused into integer kernels)."""
    return list(graph.ort_optimized(proto, what="the int8 model").graph.node)


def integer_op_counts(proto: ModelProto) -> dict[str, Any]:
    """How many operators run on integers and how many compute layers stay in float, as ONNX Runtime runs the
    model; and the NENNI layers by body (overload)."""
    nodes = optimized_nodes(proto)
    by_op = collections.Counter(n.op_type for n in nodes)
    integer = {op: c for op, c in sorted(by_op.items()) if op in INTEGER_KERNELS}
    floating = {op: c for op, c in sorted(by_op.items()) if op in FLOAT_COMPUTE_KERNELS}
    layers = graph.nenni_nodes(proto, ops.LAYER_OPS)
    bodies = collections.Counter(n.overload for n in layers)
    return {
        "integer_kernels": integer,
        "float_compute_kernels": floating,
        "integer_total": int(sum(integer.values())),
        "float_compute_total": int(sum(floating.values())),
        "nenni_layers": len(layers),
        "nenni_layers_int8": int(sum(1 for n in layers if ops.is_int8_overload(n.overload))),
        "nenni_bodies": dict(sorted(bodies.items())),
    }
