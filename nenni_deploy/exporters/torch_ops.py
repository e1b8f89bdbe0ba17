"""PyTorch custom ops that stand for a NENNI layer and its noise during export, and their ONNX translations.

`torch.onnx.export(dynamo=True)` traces the model; these ops stay opaque to the tracer and translate to single
`ai.nenni` nodes. The translations emit the bare custom node: the exporter would inline a function given here
(its version-conversion pass inlines local functions), so the bodies are attached after export.

The eager implementations follow `nenni.layers` so the stand-in module can be checked against the original.
"""

from __future__ import annotations

from types import SimpleNamespace

import onnxscript
import torch
import torch.nn.functional as F

from ..nenni.selection import select
from . import ops

_OPSET = onnxscript.values.Opset(ops.DOMAIN, ops.DOMAIN_VERSION)


def _conv_extent(size, kernel, stride: int, pad: int, dilation: int):
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.custom_op("nenni::layer", mutates_args=())
def nenni_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    proj: torch.Tensor,
    approx_weight: torch.Tensor,
    approx_bias: torch.Tensor,
    kind: str,
    granularity: str,
    rank: str,
    k: int,
    ratio: float,
    nm: list[int],
    threshold: float,
    strides: list[int],
    pads: list[int],
    dilations: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, essential mask) of one NENNI layer (approx_weight already fake-quantised)."""
    if kind == "conv":
        geometry = dict(stride=tuple(strides), padding=(pads[0], pads[1]), dilation=tuple(dilations))
        pred = F.conv2d(F.conv2d(x, proj, None, **geometry), approx_weight[:, :, None, None], approx_bias)
        exact = F.conv2d(x, weight, bias, **geometry)
    else:
        pred = F.linear(F.linear(x, proj), approx_weight, approx_bias)
        exact = F.linear(x, weight, bias)
    spec = SimpleNamespace(
        name="export", granularity=granularity, rank=rank, essential=k, nm=tuple(nm), threshold=threshold
    )
    mask = select(pred, spec)
    return torch.where(mask, exact, pred), mask


@nenni_layer.register_fake
def _nenni_layer_fake(x, weight, bias, proj, approx_weight, approx_bias, kind, granularity, rank, k, ratio, nm,
                      threshold, strides, pads, dilations):  # fmt: skip
    if kind == "conv":
        spatial = [
            _conv_extent(x.shape[2 + i], weight.shape[2 + i], strides[i], pads[i] + pads[i + 2], dilations[i])
            for i in range(2)
        ]
        shape = (x.shape[0], weight.shape[0], *spatial)
    else:
        shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.bool)


@torch.library.custom_op("nenni::noise", mutates_args=())
def nenni_noise(y: torch.Tensor, mask: torch.Tensor, scale: float, residual_rms: float, seed: int) -> torch.Tensor:
    """y plus N(0, (scale * residual_rms)^2) noise where the mask is false; seed < 0 draws from torch's RNG."""
    generator = None if seed < 0 else torch.Generator(device=y.device).manual_seed(seed)
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    return torch.where(mask, y, y + scale * residual_rms * noise)


@nenni_noise.register_fake
def _nenni_noise_fake(y, mask, scale, residual_rms, seed):
    return torch.empty_like(y)


def _translate_layer(x, weight, bias, proj, approx_weight, approx_bias, kind, granularity, rank, k, ratio, nm,
                     threshold, strides, pads, dilations):  # fmt: skip
    geometry = dict(strides=strides, pads=pads, dilations=dilations) if kind == "conv" else {}
    attrs = ops.layer_attributes(
        granularity=granularity, rank=rank, k=k, ratio=ratio, nm=nm, threshold=threshold, **geometry
    )
    op = _OPSET.NenniConv if kind == "conv" else _OPSET.NenniLinear
    return op(x, weight, bias, proj, approx_weight, approx_bias, **attrs)


def _translate_noise(y, mask, scale, residual_rms, seed):
    attrs = ops.noise_attributes(scale=scale, residual_rms=residual_rms, seed=None if seed < 0 else seed)
    return _OPSET.NenniNoise(y, mask, **attrs)


TRANSLATION_TABLE = {
    torch.ops.nenni.layer.default: _translate_layer,
    torch.ops.nenni.noise.default: _translate_noise,
}
