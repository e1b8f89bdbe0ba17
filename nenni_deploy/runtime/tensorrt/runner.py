"""`TensorRTRunner`: a serialized TensorRT engine (.plan) behind the same Runner interface as `OrtRunner`.

TensorRT 10.x API: `Runtime.deserialize_cuda_engine`, `ICudaEngine.create_execution_context`, named I/O tensors
(`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `get_tensor_dtype`), `set_input_shape`,
`set_tensor_address`, `execute_async_v3(stream)`. Device memory, streams, events and CUDA graphs come from
PyTorch (a CUDA build of torch is needed for the NENNI plugins anyway).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto

from ...errors import NenniError
from ..loading import InputSpec
from ..runners import Runner, validate_input

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def warmup_iterations(elapsed: float, done: int, warmup_seconds: float, minimum: int = 1) -> bool:
    """Whether to run one more warm-up iteration: at least `minimum`, then until `warmup_seconds` have passed."""
    return done < minimum or elapsed < warmup_seconds


class TensorRTRunner(Runner):
    """Runs a .plan built by `nenni build` (or any TensorRT 10 engine with one profile).

        with TensorRTRunner("model.plan") as runner:
            logits = runner.infer({"images": x})["logits"]
            seconds = runner.time_batches(x, iterations=200, warmup_seconds=2.0, cuda_graph=True)

    `time_batches(x, iterations, warmup_seconds, *, cuda_graph=False, include_transfers=False) -> list[float]`
    is the benchmark's entry point: x is copied to the device once, then each iteration's time (seconds) is
    measured with CUDA events recorded on the runner's stream around the engine alone (`execute_async_v3`, or
    one replay of a captured CUDA graph); with `include_transfers` the host-to-device copy of x and the copy of
    the outputs back are inside the timed region. Warm-up runs (at least one) fill the plugins' scratch buffers
    and TensorRT's lazy state before any capture and before timing.

    The NENNI plugins are registered on activation (Python plugins: this process needs tensorrt, torch,
    triton and this package), and the noise counters are rewound, so a seeded engine replays its noise from
    the start in every runner.
    """

    name = "tensorrt"

    def __init__(self, plan: str | Path, *, device: int = 0, verbose: bool = False) -> None:
        super().__init__()
        self.path = Path(plan)
        self.device = device
        self.verbose = verbose
        self.engine = None
        self.context = None
        self.stream = None
        self._inputs: list[InputSpec] = []
        self._outputs: list[str] = []
        if not self.path.is_file():
            raise NenniError(f"{self.path}: no such engine file")

    def input_specs(self) -> list[InputSpec]:
        if not self.active:
            raise NenniError(f"{self.name}: call activate() (or use `with`) first: the engine declares its inputs")
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def metadata(self) -> dict[str, str]:
        """The exported ONNX model's metadata (e.g. `nenni.cost`), from the `<plan>.json` `nenni build` writes."""
        from .build import read_plan_metadata

        return dict(read_plan_metadata(self.path).get("onnx_metadata", {}))

    def _activate(self) -> None:
        import torch

        from .plugins import register, require_tensorrt, reset_noise_state

        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise NenniError("TensorRTRunner needs a CUDA GPU and a CUDA build of torch; none is available here")
        register()
        reset_noise_state()
        torch.cuda.set_device(self.device)
        logger = trt.Logger(trt.Logger.VERBOSE if self.verbose else trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise NenniError(
                f"{self.path}: TensorRT cannot deserialize it (built with another TensorRT version or GPU, or not "
                "an engine)"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._inputs, self._outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                shape = [d if d >= 0 else None for d in self.engine.get_tensor_shape(name)]
                self._inputs.append(InputSpec(name, _NP_TO_ONNX.get(dtype, TensorProto.UNDEFINED), shape))
            else:
                self._outputs.append(name)

    def _deactivate(self) -> None:
        self.context = None
        self.engine = None
        self.stream = None

    # -- buffers --------------------------------------------------------------------------------------------
    def _bind(self, device_inputs: dict[str, Any]) -> dict[str, Any]:
        """Set input shapes and addresses, allocate the outputs on the device; returns the output tensors."""
        import torch

        from .plugins import require_tensorrt

        trt = require_tensorrt()
        for name, tensor in device_inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise NenniError(
                    f"input {name!r} of shape {list(tensor.shape)} is outside the engine's optimization profile "
                    f"({[list(s) for s in self.engine.get_tensor_profile_shape(name, 0)]}, min/opt/max)"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = getattr(torch, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name)
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise NenniError("TensorRT failed to enqueue the engine (see its log above)")

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.cuda.stream(self.stream):
            device_inputs = {
                name: torch.from_numpy(np.ascontiguousarray(value)).to("cuda", non_blocking=False)
                for name, value in feeds.items()
            }
            outputs = self._bind(device_inputs)
            self._execute()
        self.stream.synchronize()
        return {name: t.cpu().numpy() for name, t in outputs.items()}

    # -- timing ---------------------------------------------------------------------------------------------
    def time_batches(
        self,
        x: np.ndarray,
        iterations: int,
        warmup_seconds: float,
        *,
        cuda_graph: bool = False,
        include_transfers: bool = False,
    ) -> list[float]:
        """Per-iteration seconds from CUDA events (see the class docstring)."""
        import torch

        if not self.active:
            raise NenniError(f"{self.name}: call activate() (or use `with`) before time_batches()")
        if iterations < 1:
            raise NenniError(f"iterations must be >= 1, got {iterations}")
        spec = self._inputs[0]
        x = np.ascontiguousarray(x)
        validate_input(spec, x)
        host_in = torch.from_numpy(x).pin_memory()
        with torch.cuda.stream(self.stream):
            device_in = host_in.to("cuda", non_blocking=True)
            outputs = self._bind({spec.name: device_in})
            host_out = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in outputs.items()}
        graph = None

        def step() -> None:
            if include_transfers:
                device_in.copy_(host_in, non_blocking=True)
            if graph is not None:
                graph.replay()
            else:
                self._execute()
            if include_transfers:
                for n, t in outputs.items():
                    host_out[n].copy_(t, non_blocking=True)

        with torch.cuda.stream(self.stream):
            start, done = time.perf_counter(), 0
            while warmup_iterations(time.perf_counter() - start, done, warmup_seconds):
                self._execute()
                self.stream.synchronize()
                done += 1
            if cuda_graph:
                # TensorRT's advice: one enqueue before capture (done above), then capture the enqueue on our
                # stream; replays reuse the bound addresses, and the noise plugin's counter lives on the device.
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    self._execute()
                graph.replay()
                self.stream.synchronize()
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            seconds = []
            for _ in range(iterations):
                begin.record(self.stream)
                step()
                end.record(self.stream)
                end.synchronize()
                seconds.append(begin.elapsed_time(end) / 1e3)
        return seconds
