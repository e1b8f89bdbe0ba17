"""Export to ONNX and check the file against PyTorch: for any model directory (dense, pruned or NENNI)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..data import DataSpec, subset
from ..errors import NenniError
from ..exporters import graph
from ..exporters.export import ExportedModel, ExportOptions, ExportResult, build_onnx, export_to_file
from ..exporters.int8 import Int8Result, Int8Settings, quantize_int8
from ..nenni.model import Model
from ..runtime import check_proto, load_onnx_checked
from ..runtime.parity import FLOAT_TOLERANCE, ParityReport, check_parity, parity_failure, tolerance_for

PARITY_MIN_AGREEMENT = FLOAT_TOLERANCE.min_agreement  # percent top-1 agreement below which an export is refused


@dataclass
class CheckImages:
    x: torch.Tensor
    y: torch.Tensor | None
    described: str


def check_images(data: DataSpec | None, input_shape: tuple[int, ...], n: int) -> CheckImages:
    """The first n test images of the model's data set; random images (no labels) when it is not at hand."""
    if data is not None:
        try:
            ds = subset(data.load("test"), n)
            return CheckImages(ds.x, ds.y, f"{len(ds)} test images of {data.name}")
        except NenniError as exc:
            reason = str(exc)
    else:
        reason = "the model records no data set"
    x = torch.rand(n, *input_shape, generator=torch.Generator().manual_seed(0))
    return CheckImages(x, None, f"{n} random images ({reason})")


@dataclass
class CalibrationImages:
    x: torch.Tensor
    described: str


def calibration_data(model: Model, data: DataSpec | None) -> DataSpec:
    """The data set int8 calibration draws from: the one given, else the one the model records."""
    spec = data or model.data
    if spec is None:
        raise NenniError(
            f"--int8 needs calibration images and {model.label} records no data set: "
            "pass --data (digits, cifar10 or a folder) and --data-dir where its files are"
        )
    return spec


def calibration_images(spec: DataSpec, n: int, seed: int = 0) -> CalibrationImages:
    """`n` training images drawn at random (seeded) from `spec`, in data set order."""
    ds = subset(spec.load("train"), n, seed=seed)
    return CalibrationImages(ds.x, f"{len(ds)} training images of {spec.name} (random subset, seed {seed})")


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how the file compares with PyTorch."""

    options: ExportOptions
    model_dir: str | None
    result: ExportResult | None = None  # set once the file is written
    parity: ParityReport | None = None
    checked_on: str | None = None
    notes: list[str] = field(default_factory=list)
    int8: Int8Result | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "model_dir": self.model_dir,
            "out": str(r.path),
            **asdict(self.options),
            "stats": r.stats,
            "files": [str(f) for f in r.files],
            "bytes": r.bytes,
            "seconds": r.seconds,
            "metadata": r.metadata,
            "parity": self.parity.to_dict() if self.parity else None,
            "checked_on": self.checked_on,
            "notes": self.notes,
            "int8": self.int8.to_json() if self.int8 else None,
        }


def export_module_of(model: Model, dense: bool) -> tuple[torch.nn.Module, list[str]]:
    """What a `--dense` export holds: the model's original dense base (never weights fine-tuning changed)."""
    if not dense or model.kind == "dense":
        return model.module, []
    base = model.base()
    return base.module, [base.note] if base.note else []


def export_onnx(
    model: Model,
    out: str | os.PathLike,
    options: ExportOptions | None = None,
    *,
    check: bool = True,
    check_n: int = 256,
    data: DataSpec | None = None,
    threads: int | None = None,
    external_data: bool = False,
    min_agreement: float | None = None,
    int8: Int8Settings | None = None,
) -> ExportReport:
    """Export `model` (or with `options.dense` its dense base) to `out`, images in [0, 1] in and logits out; with
    `check`, ONNX Runtime must agree with PyTorch on `check_n` test images before anything is written, within
    the tolerance of the file's precision (`runtime.parity`; `min_agreement` overrides its agreement bound).

    With `int8`, the export is quantized (exporters/int8.py) on `int8.calib_n` training images of `data` (else
    the data set the model records)."""
    options = options or ExportOptions()
    module, notes = export_module_of(model, options.dense)
    card = _card(model)
    calib = None
    if int8 is not None:  # bad settings and missing data fail before the export's seconds are spent
        int8.validate()
        if options.target != "ort":
            raise NenniError("--int8 exports for ONNX Runtime only (--target ort); TensorRT builds its own int8")
        calib = calibration_images(calibration_data(model, data), int8.calib_n)
        options = replace(options, precision="int8")  # --channel-lowering auto decides for what will run
    exported = build_onnx(module, card, model.input_shape, options)
    report = ExportReport(options, str(model.path) if model.path else None, notes=notes)
    if int8 is not None:
        bits = {s["name"]: int(s.get("approx_bits", 8)) for s in card.get("layers", []) if "name" in s}
        report.int8 = quantize_int8(exported.proto, calib.x.numpy(), int8, source=calib.described, approx_bits=bits)
        proto = report.int8.proto
        exported = ExportedModel(proto, exported.seconds + report.int8.seconds, graph.node_counts(proto))
    if check:
        images = check_images(data or model.data, model.input_shape, check_n)
        loaded = check_proto(exported.proto, require_functions=False)
        report.parity = check_parity(module, loaded, images.x, images.y, threads=threads)
        report.checked_on = images.described
        tolerance = tolerance_for(loaded.metadata, min_agreement)
        report.parity.tolerance = tolerance.describe()
        failure = parity_failure(report.parity, tolerance)
        if failure:
            raise NenniError(f"parity check failed: {failure}; nothing written (use --no-check to write anyway)")
    report.result = export_to_file(
        module, card, model.input_shape, out, options, external_data=external_data, exported=exported
    )
    load_onnx_checked(out, require_functions=options.target == "ort")  # the written file reads back
    return report


def _card(model: Model) -> dict[str, Any]:
    """What the export's metadata records about the model (a model in memory has no directory card)."""
    if model.card:
        return model.card
    return {"arch": model.source.label, "model": model.source.to_dict(), "kind": model.kind, "layers": []}


@dataclass
class CheckReport:
    parity: ParityReport
    model_dir: str | None
    onnx: str
    data: str
    weights_match: bool | None
    passed: bool
    failure: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "model_dir": self.model_dir,
            "model": self.onnx,
            "data": self.data,
            "weights_match": self.weights_match,
            **self.parity.to_dict(),
            "passed": self.passed,
        }


def check_onnx(
    model: Model,
    onnx_path: str | os.PathLike,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    data_name: str = "",
    batch_size: int = 256,
    threads: int | None = None,
    min_agreement: float | None = None,
) -> CheckReport:
    """PyTorch against ONNX Runtime on (x, y): the NENNI model for a NENNI export, its dense base for a dense one,
    within the tolerance of the file's precision (`runtime.parity`; `min_agreement` overrides its bound)."""
    loaded = load_onnx_checked(onnx_path, require_functions=False)
    # A --dense export holds the model's dense base; any other export holds the model itself (a pruned one too).
    module, _ = export_module_of(model, loaded.metadata.get("nenni.dense") == "true")
    recorded = loaded.metadata.get("nenni.weights_sha256")
    weights_match = recorded == model.card.get("weights_sha256") if recorded and model.card else None
    parity = check_parity(module, loaded, x, y, batch_size=batch_size, threads=threads)
    tolerance = tolerance_for(loaded.metadata, min_agreement)
    parity.tolerance = tolerance.describe()
    failure = parity_failure(parity, tolerance)
    if weights_match is False:
        parity.warnings.append(f"{onnx_path} was exported from other weights than {model.label}")
    return CheckReport(
        parity, str(model.path) if model.path else None, str(onnx_path), data_name, weights_match, not failure, failure
    )
