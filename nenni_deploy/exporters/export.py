"""Export a NENNI model (or its dense base) to ONNX through `torch.onnx.export(dynamo=True)`.

The model is copied and every NENNI layer is swapped for a stand-in module that calls one custom op
(`torch_ops`), so the exporter handles the rest of the model's code (residual adds, shortcut padding, pooling,
the input normalisation) as usual. The result is then tidied and shaped for its target runtime (`graph`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
from torch import nn

from ..errors import NenniError, first_line
from ..nenni.cost import cost_report
from ..nenni.layers import NenniLayer, ScaledConv2d, ScaledLinear, nenni_layers
from . import graph, ops, tensorrt_check, tune
from . import torch_ops as _torch_ops  # noqa: F401  (registers the custom ops)
from .lowering_model import Layer, load_lowering_model

TARGETS = ("ort", "tensorrt")
CHOOSERS = ("auto", "tune")  # --channel-lowering values that choose per layer
MIN_OPSET = 18
MAX_OPSET = 23  # the highest the torch exporter and ONNX Runtime 1.31 agree on here
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


@dataclass
class ExportOptions:
    target: str = "ort"
    opset: int = DEFAULT_OPSET
    dense: bool = False  # the base model of the same weights (every NENNI layer exact)
    noise: bool = True  # False: leave out NenniNoise (the deterministic part of a noise model)
    noise_seed: int | None = None  # None: fresh noise in every session
    # Channel layers in ORT: "skip" computes only the essential filters; "masked" the dense convolution, then
    # selects (same outputs); or a map from layer name to one of them (what `nenni export --tune` chose).
    # "auto": the measured lowering model (lowering_model.py) decides per layer from its shape, the batch size
    # and the precision; "tune": time both bodies on every layer (tune.py) and keep the faster.
    channel_lowering: str | dict[str, str] = "skip"
    tune_batch: int = 1  # the batch size "auto" decides for and "tune" times at
    tune_threads: int = 1
    precision: str = "float32"  # what the export will run in ("int8" when exporters.int8 quantizes it after)
    batch: int | None = None  # a static batch size (None: a dynamic batch axis); the grouped lowering needs one

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise NenniError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise NenniError(f"--opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {self.opset}")
        if self.noise_seed is not None and not 0 <= self.noise_seed <= ops.MAX_SEED:
            raise NenniError(f"--noise-seed must be in [0, {ops.MAX_SEED}], got {self.noise_seed}")
        choices = self.channel_lowering.values() if isinstance(self.channel_lowering, dict) else [self.channel_lowering]
        allowed = (*ops.CHANNEL_LOWERINGS, *CHOOSERS)
        for choice in choices:
            if choice not in allowed or (choice in CHOOSERS and isinstance(self.channel_lowering, dict)):
                raise NenniError(
                    f"--channel-lowering must be one of {', '.join(ops.CHANNEL_LOWERINGS)}, got {choice!r}"
                )
            if choice in ops.STATIC_BATCH_LOWERINGS and self.batch is None:
                raise NenniError(f"--channel-lowering {choice} needs a static batch size: add --batch N")
        if self.batch is not None and self.batch < 1:
            raise NenniError(f"--batch must be >= 1, got {self.batch}")


@dataclass
class ExportedModel:
    proto: onnx.ModelProto
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


# -- stand-in modules -------------------------------------------------------------------------------------------
class ExportLayer(nn.Module):
    """Stands in for a NenniLayer in export: the effective tensors as buffers and one `nenni::layer` call."""

    def __init__(self, layer: NenniLayer, *, noise: bool, noise_seed: int | None) -> None:
        super().__init__()
        spec, exact = layer.spec, layer.exact
        self.register_buffer("weight", exact.folded_weight().detach().clone())
        self.register_buffer("bias", exact.bias.detach().clone())
        self.register_buffer("proj", layer.proj.detach().clone())
        self.register_buffer("approx_weight", layer.quantized_approx_weight().detach().clone())
        self.register_buffer("approx_bias", layer.approx_bias.detach().clone())
        if layer.is_conv:
            ph, pw = exact.padding
            geometry = (list(exact.stride), [ph, pw, ph, pw], list(exact.dilation))
        else:
            geometry = ([1, 1], [0, 0, 0, 0], [1, 1])
        if spec.granularity == "threshold" and spec.threshold is None:
            raise NenniError(f"layer {spec.name}: threshold granularity without a calibrated threshold")
        self.name = spec.name
        self.is_conv = layer.is_conv
        self.args = (
            spec.kind,
            spec.granularity,
            spec.rank,
            int(spec.essential),
            float(spec.ratio),
            list(spec.nm or (4, 8)),
            float(spec.threshold or 0.0),
            *geometry,
        )
        self.scale = float(spec.noise_scale)
        self.residual_rms = float(layer.residual_rms)
        self.noise = noise and spec.noise == "gaussian" and self.scale * self.residual_rms > 0
        self.seed = -1 if noise_seed is None else int(noise_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_conv and x.dim() != 2:
            raise NenniError(f"layer {self.name}: linear NENNI layers export only on (batch, features) inputs")
        y, mask = torch.ops.nenni.layer(
            x, self.weight, self.bias, self.proj, self.approx_weight, self.approx_bias, *self.args
        )
        if self.noise:
            y = torch.ops.nenni.noise(y, mask, self.scale, self.residual_rms, self.seed)
        return y


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def export_module(model: nn.Module, options: ExportOptions) -> nn.Module:
    """A copy of `model` ready for tracing: NENNI layers as stand-ins (or exact for --dense), folded weights."""
    model = copy.deepcopy(model).eval()
    for index, (name, layer) in enumerate(nenni_layers(model).items()):
        if options.dense or layer.mode == "exact":
            _set(model, name, layer.exact.to_plain().eval())
        else:
            seed = None if options.noise_seed is None else ops.layer_seed_for_noise(options.noise_seed, index)
            _set(model, name, ExportLayer(layer, noise=options.noise, noise_seed=seed))
    for name, module in list(model.named_modules()):
        if isinstance(module, (ScaledConv2d, ScaledLinear)):
            _set(model, name, module.to_plain().eval())
    return model


# -- export -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress to stdout and logs warnings about optional packages: library code is quiet."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def trace_to_onnx(module: nn.Module, input_shape: tuple[int, ...], opset: int, batch: int | None = None) -> ir.Model:
    """torch.onnx.export with a dynamic batch axis (or the static `batch`); the ONNX IR model, optimised by the
    exporter."""
    example = torch.rand(batch or 2, *input_shape)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},) if batch is None else None,
                custom_translation_table=_torch_ops.TRANSLATION_TABLE,
                optimize=True,
                verbose=False,
            )
    except NenniError:
        raise
    except Exception as exc:  # the exporter raises many kinds; one line names the failing stage
        raise NenniError(f"torch.onnx.export failed{_user_code_location(exc)}: {first_line(exc)}") from exc
    return program.model


def _user_code_location(exc: BaseException) -> str:
    """Where in the model's own code the exporter gave up: the last frame it reports outside torch."""
    text = "".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    frames = [f for f in frames if "/torch/" not in f[0] and "/nenni_deploy/" not in f[0]]
    if not frames:
        return ""
    file, line, func = frames[-1]
    return f" at {Path(file).name}:{line} ({func})"


def tidy(model: ir.Model) -> onnx.ModelProto:
    """Dead code out, identical initializers shared, unused opsets dropped; back to a ModelProto."""
    for pass_ in (
        ir_passes.RemoveUnusedNodesPass(),
        ir_passes.DeduplicateHashedInitializersPass(),
        ir_passes.RemoveUnusedNodesPass(),
        ir_passes.RemoveUnusedOpsetsPass(),
    ):
        pass_(model)
    return ir.serde.serialize_model(model)


def build_onnx(
    model: nn.Module, card: dict[str, Any], input_shape: tuple[int, ...], options: ExportOptions
) -> ExportedModel:
    """The finished in-memory ONNX model for `options.target`, checked (checker and shape inference)."""
    options.validate()
    start = time.perf_counter()
    traced = trace_to_onnx(export_module(model, options), tuple(input_shape), options.opset, options.batch)
    proto = tidy(traced)
    graph.trim_unused_outputs(proto)
    graph.name_nenni_nodes(proto)
    tuning = choices = None
    choosing = options.target == "ort" and not options.dense
    if options.channel_lowering == "tune" and choosing:
        tuning = tune.tune_channel_lowerings(proto, batch=options.tune_batch, threads=options.tune_threads)
        lowerings = {t.name: t.choice for t in tuning}
    elif options.channel_lowering == "auto" and choosing:
        batch = options.batch or options.tune_batch  # a static-batch graph runs at its own batch size
        choices = modelled_lowerings(proto, precision=options.precision, batch=batch, static=options.batch is not None)
        lowerings = {c["layer"]: c["choice"] for c in choices["layers"]}
    else:
        lowering = "skip" if options.channel_lowering in CHOOSERS else options.channel_lowering
        lowerings = _lowerings(proto, lowering)
    graph.shape_for_target(proto, options.target, options.opset, lowerings)
    graph.document_io(proto, input_shape)
    metadata = graph.metadata_for(card, options, proto)
    metadata["nenni.cost"] = json.dumps(_cost_totals(model, input_shape, dense=options.dense), sort_keys=True)
    metadata["nenni.overloads"] = json.dumps({n.name: n.overload for n in graph.nenni_nodes(proto, ops.LAYER_OPS)})
    if choices is not None:
        metadata["nenni.lowering"] = json.dumps(choices)
    if tuning is not None:
        metadata["nenni.tuning"] = json.dumps(
            {"batch": options.tune_batch, "threads": options.tune_threads, "layers": [asdict(t) for t in tuning]}
        )
    graph.set_metadata(proto, metadata)
    graph.check(proto)
    if options.target == "tensorrt":
        tensorrt_check.check_tensorrt_graph(proto, "the TensorRT-target export")
    seconds = time.perf_counter() - start
    return ExportedModel(proto, seconds, graph.node_counts(proto))


def modelled_lowerings(proto: onnx.ModelProto, *, precision: str, batch: int, static: bool = False) -> dict[str, Any]:
    """The lowering model's choice for every channel NenniConv node (others keep the skipping body), with the
    features it decided on (width, output positions, the essential ratio K / C_out) and its predictions of each
    candidate's time over the masked body's. `static`: the graph has a static batch size (of `batch`), so the
    grouped body is a candidate too."""
    model = load_lowering_model()
    shapes = tune.value_shapes(proto)
    weights = {t.name: list(t.dims) for t in proto.graph.initializer}
    candidates = ("skip", "grouped") if static else ("skip",)
    layers = []
    for node in graph.nenni_nodes(proto, (ops.CONV,)):
        w, out = weights.get(node.input[1]), shapes.get(node.output[0])
        if graph.node_attr(node, "granularity") != "channel" or not w or len(w) != 4:
            continue
        if not out or any(not isinstance(d, int) for d in out[2:]):
            raise NenniError(f"cannot choose a lowering for {node.name}: its output shape is unknown ({out})")
        n, c_in, kh, kw = w
        layer = Layer(c_in, n, out[2] * out[3], (kh, kw))
        ratio = int(graph.node_attr(node, "k", 1)) / n
        over_masked = {
            v: math.exp(model.predict_log_ratio(precision, batch, ratio, layer, v))
            for v in candidates
            if v in model.variants()
        }
        layers.append(
            {
                "layer": node.name,
                "c_in": c_in,
                "c_out": n,
                "width": layer.width,
                "positions": layer.positions,
                "ratio": ratio,
                "over_masked": over_masked,
                "choice": model.choose(precision, batch, ratio, layer, candidates),
            }
        )
    return {"mode": "auto", "precision": precision, "batch": batch, "model": model.measured, "layers": layers}


def _lowerings(proto: onnx.ModelProto, choice: str | dict[str, str]) -> dict[str, str]:
    if isinstance(choice, dict):
        return dict(choice)
    return {n.name: choice for n in graph.nenni_nodes(proto, ops.LAYER_OPS)}


def _cost_totals(model: nn.Module, input_shape: tuple[int, ...], *, dense: bool) -> dict[str, float]:
    """Per-image MACs and BitOPs of what the file computes, for `nenni bench`'s ideal speedups."""
    t = cost_report(model, tuple(input_shape))["totals"]
    if dense:  # a dense export computes every layer exactly
        t.update(macs_nenni=t["macs_dense"], bitops_nenni=t["bitops_dense"], mac_reduction=0.0, bitops_reduction=0.0)
        t.update(mac_ideal_speedup=1.0, bitops_ideal_speedup=1.0)
    return {k: float(v) for k, v in t.items()}


@dataclass
class ExportResult:
    path: Path
    files: list[Path]
    bytes: int  # all written files together
    seconds: float  # trace, passes, checks and writing
    stats: dict[str, Any]
    metadata: dict[str, str]


def export_to_file(
    model: nn.Module,
    card: dict[str, Any],
    input_shape: tuple[int, ...],
    out: str | Path,
    options: ExportOptions,
    *,
    external_data: bool = False,
    exported: ExportedModel | None = None,
) -> ExportResult:
    """Build (unless given) and write the model atomically; one file, or `<out>.data` beside it."""
    if exported is None:
        exported = build_onnx(model, card, input_shape, options)
    start = time.perf_counter()
    files = graph.save_model_atomic(exported.proto, out, external_data=external_data)
    seconds = exported.seconds + time.perf_counter() - start
    return ExportResult(
        path=Path(out),
        files=files,
        bytes=sum(f.stat().st_size for f in files),
        seconds=seconds,
        stats=exported.stats,
        metadata=graph.read_metadata(exported.proto),
    )
