"""Any ONNX image classifier behind one Runner: plain torch.onnx, tf2onnx or this project's exports.

Attacks and the evaluation always work on float images in [0, 1], NCHW, and want one row of scores per image.
The adapter reads from the graph what it needs to get there: the single input's name, layout (NCHW or NHWC) and
batch (dynamic, or fixed: served by splitting and padding), and whether the output holds logits, probabilities
(turned into log-probabilities, which differ from logits by a per-row constant, so margins and argmax are the
same) or only labels. What the graph expects of its pixels cannot be read from it, so it is a stated
convention (`PixelConvention`: input range 0-1 or 0-255, per-channel mean and std for a graph that wants
normalised input); the attack budget stays in [0, 1] pixel units whatever the graph expects.

    with OnnxClassifier("m.onnx", PixelConvention(input_range="0-255")) as clf:
        clf.bind(x[:16], num_classes=10)       # checks the data fits; probes the output
        scores = clf.scores(x)                 # (N, K) float32
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from ..errors import NenniError, first_line
from .loading import InputSpec, LoadedModel, load_onnx_checked
from .runners import Runner, open_runner

INPUT_RANGES = {"0-1": 1.0, "0-255": 255.0}
LAYOUTS = ("auto", "nchw", "nhwc")
OUTPUT_KINDS = ("logits", "probabilities", "labels")
# Ops whose output changes between runs of the same input: such a graph is a randomised model.
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FLOAT_INPUTS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)}
_PROBE = 16  # images run once to learn what the output holds
# log(0) would make a margin infinite: the smallest positive float32 keeps it finite (and marks saturation).
_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class PixelConvention:
    """What the graph expects of its input pixels: `x * range` in 0-1 or 0-255, then `(v - mean) / std` per
    channel, with mean and std in the units of that range (a single value applies to every channel)."""

    input_range: str = "0-1"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "auto"

    def __post_init__(self) -> None:
        if self.input_range not in INPUT_RANGES:
            raise NenniError(f"input range must be one of {', '.join(INPUT_RANGES)}, got {self.input_range!r}")
        if self.layout not in LAYOUTS:
            raise NenniError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and (not values or not all(math.isfinite(v) for v in values)):
                raise NenniError(f"--{name} needs finite numbers, one per channel or one for all, got {values!r}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise NenniError(f"--std must be > 0 for every channel, got {list(self.std)}")

    @property
    def scale(self) -> float:
        return INPUT_RANGES[self.input_range]

    def to_dict(self) -> dict:
        return asdict(self)


def parse_channels(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' -> a tuple; a malformed list is a one-line error naming the option."""
    if text is None or not str(text).strip():
        return None
    try:
        return tuple(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise NenniError(f"{option} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


@dataclass
class ClassifierSpec:
    """What the adapter read from the graph and learned from one probe on the data."""

    input_name: str
    input_shape: list  # as declared: ints, or a name / None where dynamic
    input_dtype: str
    output_name: str
    layout: str | None = None  # nchw / nhwc once bound
    batch: int | None = None  # a fixed batch size, or None for a dynamic batch
    output: str | None = None  # logits / probabilities / labels once bound
    num_classes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class OnnxClassifier(Runner):
    """An ONNX image classifier as the evaluation sees it: [0, 1] NCHW images in, one row of scores out.

    `infer(feeds)` runs the raw graph (the Runner interface); `scores(x)` and `labels(x)` take images in [0, 1]
    and apply the pixel convention, layout and batching. `images_run` counts the images sent through the
    session (the padding of a fixed batch excluded), which is what a query-based attack spends.
    """

    name = "onnx-classifier"

    def __init__(
        self,
        model: LoadedModel | str | os.PathLike,
        pixels: PixelConvention | None = None,
        *,
        provider: str = "cpu",
        threads: int | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise NenniError(f"batch size must be >= 1, got {batch_size}")
        self.model = model if isinstance(model, LoadedModel) else load_onnx_checked(model)
        self.where = str(self.model.path) if self.model.path else "the model"
        self.pixels = pixels or PixelConvention()
        self.batch_size = batch_size
        self.ort = open_runner(self.model, provider=provider, threads=threads, session_options=_options())
        self.spec = self._read_graph()
        self.randomised = self.model.noise_nodes > 0 or bool(_random_ops(self.model.proto))
        self.images_run = 0
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None
        self._dtype = helper.tensor_dtype_to_np_dtype(self.model.inputs[0].elem_type)

    # -- what the graph declares ----------------------------------------------------------------------------
    def _read_graph(self) -> ClassifierSpec:
        inputs = self.model.inputs
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise NenniError(f"{self.where} has {len(inputs)} inputs ({names}): an image classifier takes one")
        spec = inputs[0]
        dtype = _np_dtype(spec)
        if dtype not in _FLOAT_INPUTS:
            raise NenniError(
                f"{self.where}: input {spec.name!r} is {dtype.name if dtype else 'not a tensor'}: "
                "only float image inputs are supported (a perturbation in [0, 1] pixel units needs them)"
            )
        if len(spec.shape) != 4:
            raise NenniError(
                f"{self.where}: input {spec.name!r} has shape {_text(spec.shape)}: not an image batch "
                "(N, C, H, W or N, H, W, C)"
            )
        output = self._choose_output()
        return ClassifierSpec(spec.name, list(spec.shape), dtype.name, output)

    def _choose_output(self) -> str:
        """The one output, or the one float output among an int label and float scores (tf2onnx often gives
        both); anything else is ambiguous."""
        outputs = self.model.proto.graph.output
        if len(outputs) == 1:
            return outputs[0].name
        floats = [o.name for o in outputs if o.type.tensor_type.elem_type in _FLOAT_TENSOR_TYPES]
        if len(floats) == 1:
            return floats[0]
        names = ", ".join(o.name for o in outputs)
        raise NenniError(
            f"{self.where} has {len(outputs)} outputs ({names}): an image classifier gives one row of scores per image"
        )

    # -- the Runner interface -------------------------------------------------------------------------------
    def input_specs(self) -> list[InputSpec]:
        return self.ort.input_specs()

    def _activate(self) -> None:
        self.ort.activate()

    def _deactivate(self) -> None:
        self.ort.deactivate()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.ort._infer(feeds)

    # -- binding to the data --------------------------------------------------------------------------------
    def bind(self, sample: torch.Tensor | np.ndarray, num_classes: int | None = None) -> ClassifierSpec:
        """Check that images shaped like `sample` (N, C, H, W in [0, 1]) fit the graph, and learn from one run
        on them what the output holds; `num_classes` (the data's) must match the output's class count."""
        sample = _numpy(sample)
        if sample.ndim != 4 or len(sample) == 0:
            raise NenniError(f"the data must be a batch of images (N, C, H, W), got shape {list(sample.shape)}")
        c, h, w = sample.shape[1:]
        spec = self.spec
        spec.layout = self._layout((c, h, w))
        first = spec.input_shape[0]
        spec.batch = first if isinstance(first, int) and first > 0 else None
        self._channels(c)
        self.activate()
        probe = sample[: min(len(sample), _PROBE)]
        raw = self._run(probe)
        spec.output, spec.num_classes = self._output_kind(raw, len(probe))
        if num_classes is not None and spec.num_classes is not None and spec.num_classes != num_classes:
            raise NenniError(
                f"{self.where} scores {spec.num_classes} classes, the data has {num_classes}: "
                "it is not a classifier for this data set"
            )
        self.images_run = 0
        return spec

    def _layout(self, image: tuple[int, int, int]) -> str:
        c, h, w = image
        dims = self.spec.input_shape[1:]
        want = {"nchw": (c, h, w), "nhwc": (h, w, c)}
        fits = {k: all(not _static(d) or d == v for d, v in zip(dims, shape, strict=True)) for k, shape in want.items()}
        layout = self.pixels.layout
        if layout == "auto":
            candidates = [k for k, ok in fits.items() if ok]
            if len(candidates) == 2:
                # Both fit: the channel axis is the static one (a graph rarely fixes only its spatial size).
                if _static(dims[0]) and not _static(dims[2]):
                    candidates = ["nchw"]
                elif _static(dims[2]) and not _static(dims[0]):
                    candidates = ["nhwc"]
                elif dims[0] == c and dims[2] != c:
                    candidates = ["nchw"]
                elif dims[2] == c and dims[0] != c:
                    candidates = ["nhwc"]
            if len(candidates) == 1:
                return candidates[0]
            if len(candidates) == 2:
                raise NenniError(
                    f"{self.where}: cannot tell whether input {self.spec.input_name!r} {_text(self.spec.input_shape)} "
                    "is NCHW or NHWC: pass --layout nchw or nhwc"
                )
            layout = "nchw"  # for the message below
        if not fits[layout]:
            raise NenniError(
                f"{self.where}: input {self.spec.input_name!r} takes {_text(self.spec.input_shape)} "
                f"({'NCHW' if layout == 'nchw' else 'NHWC'}); the data's images are {c}x{h}x{w} (C x H x W)"
            )
        return layout

    def _channels(self, c: int) -> None:
        for name, values in (("mean", self.pixels.mean), ("std", self.pixels.std)):
            if values is not None and len(values) not in (1, c):
                raise NenniError(f"--{name} has {len(values)} values; the images have {c} channels (give 1 or {c})")
        shape = (1, c, 1, 1)
        mean = self.pixels.mean or (0.0,)
        std = self.pixels.std or (1.0,)
        self._mean = np.broadcast_to(np.asarray(mean, np.float32).reshape(-1, 1, 1), shape[1:]).reshape(shape)
        self._std = np.broadcast_to(np.asarray(std, np.float32).reshape(-1, 1, 1), shape[1:]).reshape(shape)

    def _output_kind(self, raw: np.ndarray, n: int) -> tuple[str, int | None]:
        name = self.spec.output_name
        if raw.ndim == 0 or raw.shape[0] != n:
            raise NenniError(
                f"{self.where}: output {name!r} has shape {list(raw.shape)} for {n} images: "
                "not one row of scores per image"
            )
        rest = [d for d in raw.shape[1:] if d != 1]
        if raw.dtype.kind in "iu":
            if rest:
                raise NenniError(
                    f"{self.where}: output {name!r} is {raw.dtype.name} of shape {list(raw.shape)}: "
                    "neither one label nor one row of scores per image"
                )
            return "labels", None
        if raw.dtype.kind != "f" or len(rest) != 1 or rest[0] < 2:
            raise NenniError(
                f"{self.where}: output {name!r} has shape {list(raw.shape)} ({raw.dtype.name}) for {n} images: "
                "not one row of scores per image"
            )
        rows = raw.reshape(n, -1).astype(np.float64)
        if not np.isfinite(rows).all():
            raise NenniError(f"{self.where}: output {name!r} is not finite on clean images")
        is_prob = rows.min() >= 0 and rows.max() <= 1 + 1e-6 and np.abs(rows.sum(1) - 1).max() <= 1e-3
        return ("probabilities" if is_prob else "logits"), rest[0]

    # -- running ----------------------------------------------------------------------------------------------
    def _feed(self, x: np.ndarray) -> np.ndarray:
        v = x * np.float32(self.pixels.scale) if self.pixels.scale != 1 else x
        if self.pixels.mean is not None or self.pixels.std is not None:
            v = (v - self._mean) / self._std
        if self.spec.layout == "nhwc":
            v = v.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(v, dtype=self._dtype)

    def _run_once(self, feed: np.ndarray) -> np.ndarray:
        try:
            (out,) = self.ort.session.run([self.spec.output_name], {self.spec.input_name: feed})
        except Exception as exc:  # ORT raises its own exception types from C++
            raise NenniError(f"ONNX Runtime failed on {self.where}: {first_line(exc)}") from None
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        """The raw output for every image of x, `batch_size` (or the fixed batch) at a time."""
        if not self.active:
            raise NenniError(f"{self.name}: call activate() (or use `with`) before running it")
        if not np.isfinite(x).all():
            raise NenniError("the images contain NaN or Inf values: refusing to run")
        step = self.spec.batch or self.batch_size
        outs = []
        for start in range(0, len(x), step):
            part = x[start : start + step]
            n = len(part)
            if self.spec.batch and n < self.spec.batch:
                # A fixed batch: pad with copies of the last image and drop their outputs.
                part = np.concatenate([part, np.repeat(part[-1:], self.spec.batch - n, axis=0)])
            out = self._run_once(self._feed(part))
            if out.ndim == 0 or out.shape[0] != len(part):
                raise NenniError(
                    f"{self.where}: output {self.spec.output_name!r} has shape {list(out.shape)} for {len(part)} "
                    "images: not one row of scores per image"
                )
            outs.append(out[:n])
            self.images_run += n
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _bound(self) -> None:
        if self.spec.output is None:
            raise NenniError(f"{self.name}: call bind(images) before scores() or labels()")

    def scores(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, K) float32: the logits, or the log-probabilities of a graph that outputs probabilities."""
        self._bound()
        if self.spec.output == "labels":
            raise NenniError(f"{self.where} outputs labels only: score-based attacks do not apply to it")
        x = _numpy(x)
        if len(x) == 0:
            return np.zeros((0, self.spec.num_classes or 0), np.float32)
        raw = self._run(x).reshape(len(x), -1).astype(np.float32, copy=False)
        if self.spec.output == "probabilities":
            return np.log(np.maximum(raw, _TINY))
        return raw

    def labels(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        self._bound()
        x = _numpy(x)
        if len(x) == 0:
            return np.zeros(0, np.int64)
        raw = self._run(x)
        if self.spec.output == "labels":
            return raw.reshape(len(x)).astype(np.int64)
        return raw.reshape(len(x), -1).argmax(1)

    def saturation(self, x: torch.Tensor | np.ndarray) -> float:
        """% of images whose top probability is 1.0 in float32: the other classes' scores underflow there, and
        a score-based attack sees a flat loss until an input moves off that plateau."""
        if self.spec.output != "probabilities":
            return 0.0
        raw = self._run(_numpy(x)).reshape(len(x), -1)
        return float((raw.max(1) >= 1.0).mean() * 100)

    def describe(self) -> dict:
        return {**self.spec.to_dict(), "pixels": self.pixels.to_dict(), "randomised": self.randomised}


_FLOAT_TENSOR_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def _options():
    """No spinning between runs: a query-based attack does its own work between two runs, and ORT's threads
    spinning there slowed it several times over (measured on two cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _np_dtype(spec: InputSpec) -> np.dtype | None:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(spec.elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def _text(shape: Sequence) -> str:
    return "[" + ", ".join(str(d) if _static(d) else "?" for d in shape) + "]"


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _random_ops(proto: onnx.ModelProto) -> set[str]:
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    return {n.op_type for n in nodes if n.op_type in RANDOM_OPS and n.domain in ("", "ai.onnx")}


def open_classifier(
    path: str | os.PathLike,
    pixels: PixelConvention | None = None,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    batch_size: int = 256,
) -> OnnxClassifier:
    """An inactive adapter for the ONNX file at `path` (checked on load; `bind` it to the data before use)."""
    return OnnxClassifier(Path(path), pixels, provider=provider, threads=threads, batch_size=batch_size)
