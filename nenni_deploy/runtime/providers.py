"""ONNX Runtime execution-provider options for GPU machines: the CUDA provider and the TensorRT provider.

`OrtRunner(model, provider="tensorrt", gpu=GpuSettings(...))` passes these to `InferenceSession` as
(name, options) pairs. The option names are ONNX Runtime's (onnxruntime-gpu 1.2x, TensorRT 10.x); ORT takes
every value as a string.

What the TensorRT provider can run: the `--target ort` export (standard ops only: the NENNI bodies are inlined,
and TensorRT takes the subgraphs its parser supports, the rest falls to CUDA), and dense models. The
`--target tensorrt` export needs the NENNI plugins, which are Python (`tensorrt.plugin`) plugins: use
`nenni build` and `TensorRTRunner` for it. `plugin_libs` is for compiled TensorRT plugin libraries (.so),
which ORT loads into its TensorRT provider (trt_extra_plugin_lib_paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NenniError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


@dataclass
class GpuSettings:
    """Settings for the cuda and tensorrt providers (ignored by cpu)."""

    device_id: int = 0
    fp16: bool = False  # TensorRT provider: build FP16 engines
    engine_cache_dir: Path | None = None  # TensorRT provider: engine and timing caches (reused across sessions)
    plugin_libs: Sequence[str | Path] = field(default_factory=tuple)  # compiled TensorRT plugin libraries
    workspace_mib: int | None = None  # TensorRT provider: builder workspace
    # TensorRT provider: an optimization profile over the batch axis, e.g. {"images": (1, 3, 32, 32)} per bound
    profile_min: dict[str, Sequence[int]] | None = None
    profile_opt: dict[str, Sequence[int]] | None = None
    profile_max: dict[str, Sequence[int]] | None = None
    cuda_graph: bool = False  # both providers: capture and replay a CUDA graph (static shapes only)
    conv_algo_search: str = "EXHAUSTIVE"  # CUDA provider: cuDNN convolution algorithm search

    def validate(self) -> None:
        if self.device_id < 0:
            raise NenniError(f"device id must be >= 0, got {self.device_id}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise NenniError(f"workspace must be at least 1 MiB, got {self.workspace_mib}")
        if self.conv_algo_search not in CONV_ALGO_SEARCH:
            raise NenniError(f"conv algo search must be one of {', '.join(CONV_ALGO_SEARCH)}")
        for lib in self.plugin_libs:
            if not Path(lib).is_file():
                raise NenniError(f"TensorRT plugin library {lib} does not exist")
        bounds = [b for b in (self.profile_min, self.profile_opt, self.profile_max) if b is not None]
        if bounds and len(bounds) != 3:
            raise NenniError("a TensorRT profile needs all three of min, opt and max shapes")
        if bounds and not (set(bounds[0]) == set(bounds[1]) == set(bounds[2])):
            raise NenniError("the profile's min, opt and max shapes must name the same inputs")


def _flag(value: bool) -> str:
    return "True" if value else "False"


def _shapes(bound: dict[str, Sequence[int]]) -> str:
    """ORT's profile syntax: name:d0xd1x...,name2:..."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in dims)}" for name, dims in bound.items())


def cuda_options(gpu: GpuSettings) -> dict[str, str]:
    return {
        "device_id": str(gpu.device_id),
        "cudnn_conv_algo_search": gpu.conv_algo_search,
        "do_copy_in_default_stream": "1",
        "enable_cuda_graph": "1" if gpu.cuda_graph else "0",
    }


def tensorrt_options(gpu: GpuSettings) -> dict[str, str]:
    options = {
        "device_id": str(gpu.device_id),
        "trt_fp16_enable": _flag(gpu.fp16),
        "trt_cuda_graph_enable": _flag(gpu.cuda_graph),
    }
    if gpu.engine_cache_dir is not None:
        cache = str(Path(gpu.engine_cache_dir))
        options.update(
            trt_engine_cache_enable="True",
            trt_engine_cache_path=cache,
            trt_timing_cache_enable="True",
            trt_timing_cache_path=cache,
        )
    if gpu.plugin_libs:
        options["trt_extra_plugin_lib_paths"] = ";".join(str(Path(p)) for p in gpu.plugin_libs)
    if gpu.workspace_mib is not None:
        options["trt_max_workspace_size"] = str(int(gpu.workspace_mib) << 20)
    if gpu.profile_min is not None:
        options.update(
            trt_profile_min_shapes=_shapes(gpu.profile_min),
            trt_profile_opt_shapes=_shapes(gpu.profile_opt),
            trt_profile_max_shapes=_shapes(gpu.profile_max),
        )
    return options


def provider_list(names: Sequence[str], gpu: GpuSettings | None) -> list[str | tuple[str, dict[str, str]]]:
    """ORT's `providers=` argument for the chosen provider names: (name, options) for GPU providers."""
    gpu = gpu or GpuSettings()
    gpu.validate()
    out: list[Any] = []
    for name in names:
        if name == TENSORRT:
            out.append((name, tensorrt_options(gpu)))
        elif name == CUDA:
            out.append((name, cuda_options(gpu)))
        else:
            out.append(name)
    return out


def prepare_cache_dir(gpu: GpuSettings | None) -> None:
    """Create the engine cache folder (ORT's TensorRT provider does not)."""
    if gpu is not None and gpu.engine_cache_dir is not None:
        try:
            Path(gpu.engine_cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NenniError(f"cannot create the engine cache {gpu.engine_cache_dir}: {exc.strerror or exc}") from None
