"""Intermediate layers worth attacking or regularising, found from what the model computes, not from its names.

One forward pass with hooks records every module's output shape in the order modules finish. A *stage output*
is, for each spatial resolution, the shallowest module that finishes last at that resolution (a ResNet's
`layer1`, `layer2`, ...; a VGG's last activation before each pooling). A *block output* is a module that a
`nn.Sequential` stage is built of (a ResNet's residual blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import Normalize


@dataclass(frozen=True)
class FeatureModule:
    name: str
    depth: int  # nesting below the model (or below a one-child wrapper such as Normalized)
    shape: tuple[int, ...]  # output shape without the batch axis
    order: int  # when the module finished, in the forward pass
    parent_is_sequential: bool


def feature_modules(model: nn.Module, input_shape: Sequence[int]) -> list[FeatureModule]:
    """Every module (not the model itself, nor an input normalisation) whose output is a (C, H, W) feature map."""
    named = dict(model.named_modules())
    seen: list[tuple[str, tuple[int, ...]]] = []

    def hook(name: str):
        def record(_module, _args, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                seen.append((name, tuple(output.shape[1:])))

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in named.items()
        if name and not isinstance(module, Normalize)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out, done = [], set()
    for order, (name, shape) in enumerate(seen):
        if name in done:  # a module called twice keeps its first output
            continue
        done.add(name)
        parent = name.rpartition(".")[0]
        out.append(FeatureModule(name, name.count("."), shape, order, isinstance(named.get(parent), nn.Sequential)))
    shift = min((f.depth for f in out), default=0)
    return [FeatureModule(f.name, f.depth - shift, f.shape, f.order, f.parent_is_sequential) for f in out]


def stage_outputs(model: nn.Module, input_shape: Sequence[int], limit: int = 4) -> list[str]:
    """The last, shallowest feature map at each spatial resolution, in forward order; at most `limit`, evenly
    spread and always including the deepest."""
    found = feature_modules(model, input_shape)
    by_size: dict[tuple[int, ...], list[FeatureModule]] = {}
    for f in found:
        by_size.setdefault(f.shape[1:], []).append(f)
    picks = []
    for group in by_size.values():
        top = min(f.depth for f in group)
        picks.append(max((f for f in group if f.depth == top), key=lambda f: f.order))
    picks.sort(key=lambda f: f.order)
    if len(picks) > limit:
        step = (len(picks) - 1) / (limit - 1)
        picks = [picks[round(i * step)] for i in range(limit)]
    return [f.name for f in picks]


def block_outputs(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The modules a sequential stage is made of (residual blocks), else the stage outputs."""
    found = feature_modules(model, input_shape)
    blocks = [f for f in found if f.parent_is_sequential and any(True for _ in _children(model, f.name))]
    return [f.name for f in sorted(blocks, key=lambda f: f.order)] or stage_outputs(model, input_shape)


def _children(model: nn.Module, name: str):
    return model.get_submodule(name).children()
