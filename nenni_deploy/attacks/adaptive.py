"""Adaptive-attack machinery for NENNI models (method.md section 3): BPDA straight-through gradients.

Top-k selection is piecewise constant in its input, so the true gradient ignores which neurons are
essential; BPDA keeps NENNI's forward pass and replaces its backward pass with a smooth surrogate's.
EOT lives in `PGD(eot=...)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..errors import NenniError
from ..nenni.layers import nenni_layers

SURROGATES = ("exact", "approx")


@contextmanager
def straight_through(model: nn.Module, via: str = "exact") -> Iterator[nn.Module]:
    """Inside the block, every NENNI layer backpropagates through `via` ("exact" layer or "approx"imator)."""
    if via not in SURROGATES:
        raise NenniError(f"BPDA surrogate must be one of {', '.join(SURROGATES)}, got {via!r}")
    layers = list(nenni_layers(model).values())
    if not layers:
        raise NenniError("BPDA needs a NENNI model: this model has no NENNI layers")
    before = [layer.gradient for layer in layers]
    for layer in layers:
        layer.gradient = via
    try:
        yield model
    finally:
        for layer, g in zip(layers, before, strict=True):
            layer.gradient = g
