"""PyTorch against ONNX Runtime on real inputs: max abs difference, top-1 agreement, accuracy of both.

With explicit noise the two runtimes draw different streams by nature, so the comparison is split:
- the deterministic part: the ONNX graph with its NenniNoise nodes bypassed against PyTorch without noise;
- the noise itself: seeded sessions reproduce each other, runs of one session differ, and each layer's
  measured noise standard deviation (on its non-essential neurons) matches scale * residual_rms;
- and, for information, the accuracy of both noisy models on the same images.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..exporters import graph
from ..nenni.layers import nenni_layers, set_mode
from .loading import LoadedModel, check_proto
from .predict import accuracy, predict_dataset
from .runners import TorchRunner, open_runner

NOISE_CHECK_IMAGES = 64
NOISE_STD_TOLERANCE = 0.15  # relative; thousands of samples per layer make this loose enough
CHECK_SEED = 1234


@dataclass(frozen=True)
class Tolerance:
    """How far ONNX Runtime may be from the float PyTorch model for `nenni check` and `nenni export` to pass.

    A float export computes the same function (differences of rounding, ~1e-5 on logits; near-ties of the top-k
    selection can flip a few channels), so only top-1 agreement is bounded. An int8 export approximates it:
    every activation is rounded to 256 levels, so its logits are bounded too, relative to their size.
    """

    precision: str  # float32 or int8
    min_agreement: float  # percent of images with the same top-1 class
    max_relative_error: float | None = None  # mean |ONNX - PyTorch| / mean |PyTorch| over all logits

    def describe(self) -> str:
        text = f"{self.precision}: top-1 agreement >= {self.min_agreement:g} %"
        if self.max_relative_error is not None:
            text += f", mean logit error <= {100 * self.max_relative_error:g} % of the mean |logit|"
        return text


FLOAT_TOLERANCE = Tolerance("float32", 99.0)
# Measured against the float32 exports of the shared ResNets (1,000-2,000 test images, min-max calibration on 256
# training images): dense int8 98.9-99.4 % agreement at 4.4-4.7 % relative logit error; channel NENNI int8
# 97.4-98.5 % at 4.9-8.1 %, and 93.8 % at 4.7 % for a calibrated-only ResNet-20 near chance accuracy, whose
# small margins flip with any rounding. A broken int8 body (a wrong scale) gave 4 % agreement and 120 % error.
INT8_TOLERANCE = Tolerance("int8", 90.0, 0.15)


def tolerance_for(metadata: dict[str, str], min_agreement: float | None = None) -> Tolerance:
    """The tolerance for an export (from its `nenni.precision` metadata); `min_agreement` overrides its bound."""
    base = INT8_TOLERANCE if metadata.get("nenni.precision") == "int8" else FLOAT_TOLERANCE
    if min_agreement is None:
        return base
    return Tolerance(base.precision, float(min_agreement), base.max_relative_error)


def parity_failure(report: ParityReport, tolerance: Tolerance) -> str | None:
    """Why `report` fails `tolerance`, or None."""
    if report.agreement < tolerance.min_agreement:
        return f"top-1 agreement {report.agreement:.2f} % is below {tolerance.min_agreement:g} %"
    limit = tolerance.max_relative_error
    if limit is not None and report.relative_error > limit:
        return f"mean logit error {100 * report.relative_error:.2f} % of the mean |logit| is above {100 * limit:g} %"
    if not report.noise_ok:
        return "the noise checks failed (see above)"
    return None


@dataclass
class ParityReport:
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    agreement: float  # top-1 agreement, percent
    relative_error: float = 0.0  # mean abs difference / mean |PyTorch logit|
    precision: str = "float32"  # what the ONNX model computes in (its `nenni.precision`)
    tolerance: str = ""  # the bounds it was checked against, in words
    accuracy_torch: float | None = None
    accuracy_onnx: float | None = None
    compared: str = "as exported"
    noise: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def noise_ok(self) -> bool:
        if not self.noise:
            return True
        n = self.noise
        return n["seeded_equal"] and n["unseeded_runs_differ"] and all(layer["ok"] for layer in n["layers"])


def compare_logits(reference: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """(max abs difference, mean abs difference, top-1 agreement in percent)."""
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    agree = float((reference.argmax(axis=1) == other.argmax(axis=1)).mean() * 100.0)
    return float(diff.max()), float(diff.mean()), agree


def torch_reference(model: nn.Module, *, dense: bool, noise: bool) -> nn.Module:
    """The PyTorch model an export must match: the exact base for --dense, with or without explicit noise."""
    ref = copy.deepcopy(model).eval()
    if dense:
        set_mode(ref, "exact")
    if not noise:
        for layer in nenni_layers(ref).values():
            layer.spec.noise = "none"
    return ref


def runnable_proto(loaded: LoadedModel):
    """The proto to run on ORT: a TensorRT-target export gets its function bodies attached in memory."""
    return graph.to_ort_form(loaded.proto) if loaded.target == "tensorrt" else loaded.proto


def check_parity(
    model: nn.Module,
    loaded: LoadedModel,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray | None = None,
    *,
    batch_size: int = 256,
    threads: int | None = None,
) -> ParityReport:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    dense = loaded.metadata.get("nenni.dense") == "true" or not loaded.is_nenni
    proto = runnable_proto(loaded)
    noisy = loaded.noise_nodes > 0
    deterministic = check_proto(graph.without_noise(proto)) if noisy else check_proto(proto)
    input_shape = tuple(x.shape[1:])
    ref = torch_reference(model, dense=dense, noise=False)
    with TorchRunner(ref, input_shape, threads=threads) as tr:
        torch_logits = predict_dataset(tr, x, batch_size)
    with open_runner(deterministic, threads=threads) as runner:
        onnx_logits = predict_dataset(runner, x, batch_size)
        warnings = list(runner.warnings)
    max_diff, mean_diff, agree = compare_logits(torch_logits, onnx_logits)
    scale = float(np.abs(torch_logits).mean())
    report = ParityReport(
        images=len(x),
        max_abs_diff=max_diff,
        mean_abs_diff=mean_diff,
        agreement=agree,
        relative_error=mean_diff / scale if scale > 0 else 0.0,
        precision=loaded.metadata.get("nenni.precision", "float32"),
        compared="without noise (deterministic part)" if noisy else "as exported",
        warnings=warnings,
    )
    if y is not None:
        report.accuracy_torch = accuracy(torch_logits, y)
        report.accuracy_onnx = accuracy(onnx_logits, y)
    if noisy:
        report.noise = noise_checks(model, proto, x, y, batch_size=batch_size, threads=threads)
    return report


def noise_checks(
    model: nn.Module,
    proto,
    x: np.ndarray,
    y: np.ndarray | torch.Tensor | None,
    *,
    batch_size: int,
    threads: int | None,
) -> dict[str, Any]:
    sample = np.ascontiguousarray(x[:NOISE_CHECK_IMAGES])
    seeded = check_proto(graph.with_noise_seed(proto, CHECK_SEED))
    runs = []
    for _ in range(2):  # two fresh sessions of one seeded model draw the same stream
        with open_runner(seeded, threads=threads) as runner:
            runs.append(predict_dataset(runner, sample, batch_size))
    with open_runner(check_proto(proto), threads=threads) as runner:  # as exported: every run draws afresh
        first, second = (predict_dataset(runner, sample, batch_size) for _ in range(2))
    result: dict[str, Any] = {
        "images": len(sample),
        "seeded_equal": bool(np.array_equal(runs[0], runs[1])),
        "unseeded_runs_differ": bool(np.abs(first - second).max() > 0),
        "run_to_run_max_abs_diff": float(np.abs(first - second).max()),
        "layers": layer_noise_stats(proto, sample, threads=threads),
    }
    if y is not None:
        with open_runner(check_proto(proto), threads=threads) as runner:
            onnx_noisy = predict_dataset(runner, x, batch_size)
        with TorchRunner(torch_reference(model, dense=False, noise=True), tuple(x.shape[1:]), threads=threads) as tr:
            torch_noisy = predict_dataset(tr, x, batch_size)
        result["accuracy_torch_noisy"] = accuracy(torch_noisy, y)
        result["accuracy_onnx_noisy"] = accuracy(onnx_noisy, y)
    return result


def layer_noise_stats(proto, sample: np.ndarray, *, threads: int | None) -> list[dict[str, Any]]:
    """Measured standard deviation of the noise each NenniNoise node adds to its non-essential neurons."""
    exposed, records = graph.expose_noise(proto)
    with open_runner(check_proto(exposed), threads=threads) as runner:
        values = runner.infer({runner.input_specs()[0].name: sample})
    stats = []
    for record in records:
        y, m, z = (values[name] for name in record["values"])
        added = (z - y)[~m]
        measured = float(added.std()) if added.size > 1 else 0.0
        expected = record["expected_std"]
        ok = added.size > 1 and abs(measured - expected) <= NOISE_STD_TOLERANCE * expected
        stats.append(
            {
                "layer": record["layer"],
                "expected_std": expected,
                "measured_std": measured,
                "samples": int(added.size),
                "ok": bool(ok),
            }
        )
    return stats
