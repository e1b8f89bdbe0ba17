"""The NENNI ops as TensorRT plugins through `tensorrt.plugin` (quickly deployable plugins, IPluginV3).

`register()` defines, once per process and only when TensorRT imports, for each op of `ops.PLUGIN_SPECS`:
- `@trtp.register("nenni::<Op>")`: attributes exactly as `nenni export --target tensorrt` writes them, output
  shapes from `launch.layer_output_shape` over TensorRT's symbolic shapes, float32 outputs and an int32 0/1
  mask (plugins cannot exchange bool tensors; see `launch.LAYER_TYPES`);
- `@trtp.autotune`: the one type combination the kernels implement (`launch.type_combination`), linear layout;
- `@trtp.impl`: the Triton kernels of `kernels`, launched on the stream TensorRT gives, through PyTorch views
  of TensorRT's buffers (no copies).

TensorRT's ONNX parser finds these by (op type, `plugin_version` "1", `plugin_namespace` "nenni"), which is
what the exporter writes; `exporters.tensorrt_check` checks that statically.

No ahead-of-time (`@trtp.aot_impl`) implementation, so an engine with NENNI layers needs Python, tensorrt,
torch, triton and this package where it runs (call `register()` before deserialising). The reason: an AOT
plugin embeds exactly one kernel, whose arguments are the plugin's tensors and int32 shape expressions. A NENNI
layer is a short pipeline (projection, approximator, selection, then only the selected filters) with scratch
memory between the steps, and the noise op needs a counter that outlives one enqueue so that CUDA graph replay
draws fresh noise: neither fits one stateless kernel without giving up the channel skipping or the fresh noise.

This module deliberately has no `from __future__ import annotations`: `tensorrt.plugin` reads the decorated
functions' annotations as types to learn the attribute types.
"""

import os
import threading
from typing import List, Tuple

import numpy as np
import numpy.typing as npt

from ...errors import NenniError
from ...exporters import ops
from .launch import LayerAttrs, layer_output_shape, noise_seed, type_combination

_LOCK = threading.Lock()
_REGISTERED = False
# Unseeded noise nodes share one Philox key per process (their device counter separates the streams).
_PROCESS_SEED = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorrt():
    """The tensorrt module, or one NenniError line saying what to install."""
    try:
        import tensorrt
        import tensorrt.plugin  # noqa: F401  (TensorRT >= 10.7)
    except ImportError as exc:
        raise NenniError(
            f"TensorRT is not available here ({exc}); on an NVIDIA GPU machine install it with "
            "pip install -e '.[tensorrt]' (see docs/tensorrt.md)"
        ) from None
    return tensorrt


def register() -> None:
    """Define the three plugins with tensorrt.plugin (idempotent). Raises NenniError without TensorRT."""
    global _REGISTERED
    require_tensorrt()
    with _LOCK:
        if _REGISTERED:
            return
        _define()
        _REGISTERED = True


def reset_noise_state() -> None:
    """Rewind the noise counters: a seeded engine then replays its noise from the start, as a fresh process."""
    from . import kernels

    kernels.NOISE_STATE.reset()


# Where the plugin implementations see their tensors: TensorRT's buffers on the GPU. The tests set "cpu" to run
# the same implementations under Triton's interpreter with CPU tensors standing in for TensorRT's.
DEVICE = "cuda"


def _on_stream(stream: int):
    """TensorRT's stream as PyTorch's (and so Triton's) current stream for the launches of one enqueue."""
    import contextlib

    import torch

    if DEVICE == "cpu":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


def _define() -> None:
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    def views(*tensors):
        """PyTorch views of TensorRT's device buffers (they expose __cuda_array_interface__): no copies."""
        return [torch.as_tensor(t, device=DEVICE) for t in tensors]

    def dims(desc):
        return [desc.shape_expr[i] for i in range(desc.ndim)]

    def layer_outputs(x, w, attrs):
        shape = layer_output_shape(dims(x), dims(w), attrs)
        return trtp.from_shape_expr(shape, dtype=trt.float32), trtp.from_shape_expr(shape, dtype=trt.int32)

    # -- NenniConv ------------------------------------------------------------------------------------------
    @trtp.register(ops.PLUGIN_SPECS[ops.CONV].plugin_id)
    def conv_desc(
        x: trtp.TensorDesc,
        w: trtp.TensorDesc,
        b: trtp.TensorDesc,
        p: trtp.TensorDesc,
        wa: trtp.TensorDesc,
        ba: trtp.TensorDesc,
        granularity: str,
        rank: str,
        k: int,
        ratio: float,
        nm: npt.NDArray[np.int32],
        threshold: float,
        strides: npt.NDArray[np.int32],
        pads: npt.NDArray[np.int32],
        dilations: npt.NDArray[np.int32],
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        attrs = LayerAttrs.parse(
            granularity=granularity, rank=rank, k=k, nm=nm, threshold=threshold,
            strides=strides, pads=pads, dilations=dilations,
        )  # fmt: skip
        return layer_outputs(x, w, attrs)

    @trtp.autotune(ops.PLUGIN_SPECS[ops.CONV].plugin_id)
    def conv_tune(x, w, b, p, wa, ba, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(type_combination(ops.CONV), "LINEAR")]

    @trtp.impl(ops.PLUGIN_SPECS[ops.CONV].plugin_id)
    def conv_impl(
        x: trtp.Tensor,
        w: trtp.Tensor,
        b: trtp.Tensor,
        p: trtp.Tensor,
        wa: trtp.Tensor,
        ba: trtp.Tensor,
        granularity: str,
        rank: str,
        k: int,
        nm: npt.NDArray[np.int32],
        threshold: float,
        strides: npt.NDArray[np.int32],
        pads: npt.NDArray[np.int32],
        dilations: npt.NDArray[np.int32],
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        attrs = LayerAttrs.parse(
            granularity=granularity, rank=rank, k=k, nm=nm, threshold=threshold,
            strides=strides, pads=pads, dilations=dilations,
        )  # fmt: skip
        from . import kernels  # Triton compiles on first use, not at registration

        with _on_stream(stream):
            tensors = views(x, w, b, p, wa, ba, outputs[0], outputs[1])
            kernels.nenni_layer(*tensors, attrs)

    # -- NenniLinear ----------------------------------------------------------------------------------------
    @trtp.register(ops.PLUGIN_SPECS[ops.LINEAR].plugin_id)
    def linear_desc(
        x: trtp.TensorDesc,
        w: trtp.TensorDesc,
        b: trtp.TensorDesc,
        p: trtp.TensorDesc,
        wa: trtp.TensorDesc,
        ba: trtp.TensorDesc,
        granularity: str,
        rank: str,
        k: int,
        ratio: float,
        nm: npt.NDArray[np.int32],
        threshold: float,
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        attrs = LayerAttrs.parse(granularity=granularity, rank=rank, k=k, nm=nm, threshold=threshold)
        return layer_outputs(x, w, attrs)

    @trtp.autotune(ops.PLUGIN_SPECS[ops.LINEAR].plugin_id)
    def linear_tune(x, w, b, p, wa, ba, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(type_combination(ops.LINEAR), "LINEAR")]

    @trtp.impl(ops.PLUGIN_SPECS[ops.LINEAR].plugin_id)
    def linear_impl(
        x: trtp.Tensor,
        w: trtp.Tensor,
        b: trtp.Tensor,
        p: trtp.Tensor,
        wa: trtp.Tensor,
        ba: trtp.Tensor,
        granularity: str,
        rank: str,
        k: int,
        nm: npt.NDArray[np.int32],
        threshold: float,
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        attrs = LayerAttrs.parse(granularity=granularity, rank=rank, k=k, nm=nm, threshold=threshold)
        from . import kernels  # Triton compiles on first use, not at registration

        with _on_stream(stream):
            tensors = views(x, w, b, p, wa, ba, outputs[0], outputs[1])
            kernels.nenni_layer(*tensors, attrs)

    # -- NenniNoise -----------------------------------------------------------------------------------------
    @trtp.register(ops.PLUGIN_SPECS[ops.NOISE].plugin_id)
    def noise_desc(
        y: trtp.TensorDesc, m: trtp.TensorDesc, mode: str, scale: float, residual_rms: float, seed: float
    ) -> trtp.TensorDesc:
        if mode not in ops.NOISE_MODES:
            raise NenniError(f"NenniNoise mode must be one of {ops.NOISE_MODES}, got {mode!r}")
        return y.like()

    @trtp.autotune(ops.PLUGIN_SPECS[ops.NOISE].plugin_id)
    def noise_tune(y, m, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(type_combination(ops.NOISE), "LINEAR")]

    @trtp.impl(ops.PLUGIN_SPECS[ops.NOISE].plugin_id)
    def noise_impl(
        y: trtp.Tensor,
        m: trtp.Tensor,
        scale: float,
        residual_rms: float,
        seed: float,
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        key = noise_seed(seed, _PROCESS_SEED)
        from . import kernels

        with _on_stream(stream):
            yt, mt, zt = views(y, m, outputs[0])
            kernels.nenni_noise(yt, mt, zt, key, float(scale) * float(residual_rms))


PLUGIN_IDS = tuple(spec.plugin_id for spec in ops.PLUGIN_SPECS.values())
