"""Runners (Polygraphy style): one small interface over every runtime, so that prediction, parity checks and
benchmarks do not care which one runs the model.

    with OrtRunner(load_onnx_checked("m.onnx"), provider="cpu", threads=2) as runner:
        logits = runner.infer({"images": x})["logits"]
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import ModelProto, TensorProto
from torch import nn

from ..errors import NenniError, first_line
from .loading import InputSpec, LoadedModel, check_proto, load_onnx_checked
from .providers import GpuSettings, prepare_cache_dir, provider_list

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class RuntimeFallbackWarning(RuntimeWarning):
    """ONNX Runtime runs the model on another execution provider than the one asked for."""


class Runner(ABC):
    """activate() prepares the runtime, infer() runs one batch, deactivate() frees it; or use `with`."""

    name = "runner"

    def __init__(self) -> None:
        self.active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.active:
            self._activate()
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def infer(self, feeds: Mapping[str, Any] | np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        if not self.active:
            raise NenniError(f"{self.name}: call activate() (or use `with`) before infer()")
        feeds = self._as_feeds(feeds)
        for spec in self.input_specs():
            validate_input(spec, feeds.get(spec.name))
        return self._infer(feeds)

    def _as_feeds(self, feeds) -> dict[str, np.ndarray]:
        if isinstance(feeds, (np.ndarray, torch.Tensor)):
            feeds = {self.input_specs()[0].name: feeds}
        return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in feeds.items()}

    @abstractmethod
    def input_specs(self) -> list[InputSpec]: ...

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    @abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def validate_input(spec: InputSpec, value: np.ndarray | None) -> None:
    """Name, dtype, rank and static dimensions as the model declares them; finite values."""
    if value is None:
        raise NenniError(f"missing input {spec.name!r}")
    if spec.elem_type == TensorProto.FLOAT and value.dtype != np.float32:
        raise NenniError(f"input {spec.name!r} must be float32, got {value.dtype}")
    if len(spec.shape) and value.ndim != len(spec.shape):
        raise NenniError(f"input {spec.name!r} must have shape {_shape_text(spec.shape)}, got {list(value.shape)}")
    for i, (want, got) in enumerate(zip(spec.shape, value.shape, strict=False)):
        if isinstance(want, int) and want > 0 and want != got:
            raise NenniError(
                f"input {spec.name!r} must have shape {_shape_text(spec.shape)}, got {list(value.shape)} "
                f"(dimension {i} is {got}, not {want})"
            )
    if value.dtype.kind == "f" and value.size and not np.isfinite(value).all():
        nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        raise NenniError(f"input {spec.name!r} contains {nan} NaN and {inf} Inf values: refusing to run")


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


# -- ONNX Runtime -----------------------------------------------------------------------------------------------
class OrtRunner(Runner):
    """An ONNX Runtime session with a provider choice (cpu, cuda, tensorrt) and thread settings; `gpu` sets the
    cuda / tensorrt provider options (engine cache, fp16, plugin libraries: see `runtime.providers`).

    When the provider asked for is missing from this onnxruntime build, or ORT silently runs on another one,
    the runner warns (RuntimeFallbackWarning) and records it in `self.warnings`.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: LoadedModel | ModelProto,
        *,
        provider: str = "cpu",
        threads: int | None = None,
        inter_op_threads: int | None = None,
        optimization: str = "all",
        session_options: Any | None = None,
        gpu: GpuSettings | None = None,
    ) -> None:
        super().__init__()
        if provider not in PROVIDERS:
            raise NenniError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        self.model = model if isinstance(model, LoadedModel) else check_proto(model)
        if provider != "cpu" and self.model.metadata.get("nenni.precision") == "int8":
            # The int8 form targets ORT's CPU integer kernels (QLinearConv, MatMulInteger u8 x u8, ...); the GPU
            # providers lack most of them and would run the graph in pieces on the CPU, or not at all.
            raise NenniError(
                f"{self.model.path or 'the model'} is an int8 export for ONNX Runtime's CPU provider; "
                f"--provider {provider} cannot run it (use --provider cpu, or export without --int8 for GPUs)"
            )
        self.provider = provider
        self.threads = threads
        self.inter_op_threads = inter_op_threads
        self.optimization = optimization
        self.session_options = session_options
        self.gpu = gpu  # provider options for cuda / tensorrt (runtime.providers); defaults when None
        self.session = None
        self.warnings: list[str] = []

    def input_specs(self) -> list[InputSpec]:
        return self.model.inputs

    def _options(self):
        import onnxruntime as ort

        options = self.session_options or ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        if self.inter_op_threads:
            options.inter_op_num_threads = int(self.inter_op_threads)
        levels = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options.graph_optimization_level = levels[self.optimization]
        options.log_severity_level = 3  # errors only: fallbacks are reported as warnings here
        return options

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, RuntimeFallbackWarning, stacklevel=3)

    def _providers(self) -> list[str]:
        import onnxruntime as ort

        wanted = PROVIDERS[self.provider]
        available = set(ort.get_available_providers())
        if wanted[0] not in available:
            self._warn(
                f"{wanted[0]} is not available in this onnxruntime build ({', '.join(sorted(available))}); "
                "running on CPUExecutionProvider (install onnxruntime-gpu for cuda/tensorrt)"
            )
        return [p for p in wanted if p in available] or ["CPUExecutionProvider"]

    def _activate(self) -> None:
        import onnxruntime as ort

        providers = self._providers()
        where = self.model.path or "the model"
        prepare_cache_dir(self.gpu if self.provider != "cpu" else None)
        try:
            self.session = ort.InferenceSession(
                self.model.proto.SerializeToString(),
                sess_options=self._options(),
                providers=provider_list(providers, self.gpu),
            )
        except Exception as exc:  # ORT raises its own exception types from C++
            raise NenniError(f"ONNX Runtime cannot load {where}: {first_line(exc)}") from None
        used = self.session.get_providers()
        if used and used[0] != providers[0]:
            self._warn(f"ONNX Runtime fell back from {providers[0]} to {used[0]} for {where}")

    def _deactivate(self) -> None:
        self.session = None

    def bound(self, feeds: Mapping[str, Any] | np.ndarray | torch.Tensor, outputs: list[str] | None = None):
        """The session run on fixed, validated feeds as a bare call (what a benchmark times and a query-based
        attack repeats): no conversion, validation or error translation per call."""
        if not self.active:
            raise NenniError(f"{self.name}: call activate() (or use `with`) before bound()")
        feeds = self._as_feeds(feeds)
        for spec in self.input_specs():
            validate_input(spec, feeds.get(spec.name))
        names = outputs or [o.name for o in self.session.get_outputs()]
        run = self.session.run
        return lambda: run(names, feeds)

    def providers_used(self) -> list[str]:
        """The execution providers ORT actually uses, first choice first."""
        return list(self.session.get_providers()) if self.session is not None else []

    def end_profiling(self) -> str:
        """With SessionOptions.enable_profiling: stop and return the trace file's path."""
        return self.session.end_profiling()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:
            raise NenniError(f"ONNX Runtime failed: {first_line(exc)}") from None
        return dict(zip(names, values, strict=True))


def open_runner(
    model: str | os.PathLike | LoadedModel | ModelProto,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    inter_op_threads: int | None = None,
    session_options: Any | None = None,
    gpu: GpuSettings | None = None,
) -> Runner:
    """The one place a file becomes a runner: a TensorRT engine (.plan) for TensorRTRunner, anything else an ONNX
    model (path, loaded or proto) for an ONNX Runtime session. Not yet active: use `with` or activate()."""
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix == ".plan":
        path = Path(model)
        if not path.is_file():
            raise NenniError(f"{path}: no such TensorRT engine file")
        if provider not in ("cpu", "tensorrt") or threads or inter_op_threads or session_options:
            raise NenniError(f"{path}: a TensorRT engine runs on its GPU; provider and thread options do not apply")
        try:
            from .tensorrt.runner import TensorRTRunner
        except ImportError:
            raise NenniError(
                f"{path}: TensorRT engines need TensorRT and a CUDA GPU (pip install -e '.[tensorrt]')"
            ) from None
        return TensorRTRunner(path)
    if isinstance(model, (str, os.PathLike)):
        model = load_onnx_checked(model)
    return OrtRunner(
        model,
        provider=provider,
        threads=threads,
        inter_op_threads=inter_op_threads,
        session_options=session_options,
        gpu=gpu,
    )


# -- PyTorch ----------------------------------------------------------------------------------------------------
class TorchRunner(Runner):
    """A PyTorch module behind the same interface (images in, logits out)."""

    name = "pytorch"

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        *,
        threads: int | None = None,
        input_name: str = "images",
        output_name: str = "logits",
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = InputSpec(input_name, TensorProto.FLOAT, ["batch", *input_shape])
        self.output_name = output_name
        self.threads = threads
        self._saved_threads: int | None = None

    def input_specs(self) -> list[InputSpec]:
        return [self.spec]

    def _activate(self) -> None:
        self.model.eval()
        if self.threads:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def _deactivate(self) -> None:
        if self._saved_threads:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feeds[self.spec.name])))
        return {self.output_name: out.detach().cpu().numpy()}
