"""A small autotuner for channel layers in ONNX Runtime (as TensorRT picks tactics): per layer, time the
skipping body and the masked one (dense convolution, then select) on the layer's real weights and input shape,
and keep the faster. Both give the same outputs; only their speed differs, and it differs by layer width,
spatial size, batch size and machine, so it is measured rather than guessed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper

from ..errors import NenniError
from . import graph, ops


@dataclass
class LayerTiming:
    name: str
    input_shape: list[int]
    skip_ms: float
    masked_ms: float

    @property
    def choice(self) -> str:
        return "skip" if self.skip_ms <= self.masked_ms else "masked"


def value_shapes(proto: ModelProto) -> dict[str, list]:
    """Every value's inferred shape (None for unknown dimensions)."""
    ops.register_schemas()
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def layer_model(proto: ModelProto, node: NodeProto, input_shape: list[int], lowering: str) -> ModelProto:
    """The node alone, with its weights, one lowering's body and a fixed input shape."""
    inits = {t.name: t for t in proto.graph.initializer}
    single = NodeProto()
    single.CopyFrom(node)
    for i in range(1, len(single.output)):
        single.output[i] = ""  # only Y is timed; an empty name keeps the schema's output count
    single.overload = graph.layer_overload(node, proto, lowering)
    weights = [inits[name] for name in node.input[1:] if name]
    g = helper.make_graph(
        [single],
        "layer",
        [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        initializer=weights,
    )
    ir_version = max(proto.ir_version, graph.OVERLOAD_IR_VERSION)  # the body is an overloaded function
    model = helper.make_model(g, opset_imports=list(proto.opset_import), ir_version=ir_version)
    model.functions.append(ops.function_for_node(single, graph.model_opset(proto)))
    return model


def _session(model: ModelProto, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _time_pair(sessions, x: np.ndarray, seconds: float, rounds: int = 5) -> list[float]:
    """Interleaved medians of per-run latency (ms) for each session."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):  # warm-up
        s.run(None, f)
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            end = time.perf_counter() + seconds / rounds / len(sessions)
            while True:
                t0 = time.perf_counter()
                s.run(None, f)
                samples[i].append(time.perf_counter() - t0)
                if time.perf_counter() >= end:
                    break
    return [float(np.median(v)) * 1e3 for v in samples]


def tune_channel_lowerings(
    proto: ModelProto, *, batch: int = 1, threads: int = 1, seconds: float = 0.4, seed: int = 0
) -> list[LayerTiming]:
    """Time both lowerings of every channel NenniConv node of an ORT-target export; one entry per layer."""
    if batch < 1 or threads < 1 or not seconds > 0:
        raise NenniError("tuning needs batch >= 1, threads >= 1 and a positive time per layer")
    shapes = value_shapes(proto)
    rng = np.random.default_rng(seed)
    timings = []
    for node in graph.nenni_nodes(proto, (ops.CONV,)):
        if graph.node_attr(node, "granularity") != "channel":
            continue
        dims = shapes.get(node.input[0])
        if not dims or any(d is None for d in dims[1:]):
            raise NenniError(f"cannot tune {node.name}: its input shape is not known statically ({dims})")
        shape = [batch, *dims[1:]]
        sessions = [_session(layer_model(proto, node, shape, lowering), threads) for lowering in ("skip", "masked")]
        x = rng.random(shape, dtype=np.float32)
        skip_ms, masked_ms = _time_pair(sessions, x, seconds)
        timings.append(LayerTiming(node.name, shape, skip_ms, masked_ms))
    return timings
