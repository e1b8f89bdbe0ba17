"""Give a freshly built architecture the layer widths stored in a checkpoint of its channel-pruned form.

Structured pruning (torch-pruning) shrinks convolutions, batch norms and linear layers in place; the pruned model
is the original architecture with other widths. Rebuilding it needs no pruning library and no pickled module:
build the original, then resize each of those layers to the shapes the saved weights have.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import NenniError


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _conv(mod: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    out_channels, per_group = int(weight.shape[0]), int(weight.shape[1])
    if mod.groups == 1:
        groups, in_channels = 1, per_group
    elif mod.groups == mod.in_channels == mod.out_channels:  # depthwise stays depthwise
        groups = in_channels = out_channels
    else:
        groups, in_channels = mod.groups, per_group * mod.groups
    return nn.Conv2d(
        in_channels,
        out_channels,
        mod.kernel_size,
        stride=mod.stride,
        padding=mod.padding,
        dilation=mod.dilation,
        groups=groups,
        bias=mod.bias is not None,
        padding_mode=mod.padding_mode,
    )


def resize_to_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Resize every Conv2d, BatchNorm and Linear whose stored weights have other shapes (in place); return their
    names. Layers the checkpoint does not mention keep their size."""
    resized = []
    for name, mod in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if isinstance(mod, nn.Conv2d) and weight is not None and weight.shape != mod.weight.shape:
            new: nn.Module = _conv(mod, weight)
        elif isinstance(mod, nn.Linear) and weight is not None and weight.shape != mod.weight.shape:
            new = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=mod.bias is not None)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            stat = state.get(f"{name}.running_mean", weight)
            if stat is None or stat.shape[0] == mod.num_features:
                continue
            new = type(mod)(int(stat.shape[0]), eps=mod.eps, momentum=mod.momentum, affine=mod.affine)
        else:
            continue
        if not name:
            raise NenniError("the model itself is a single layer of another width: nothing to rebuild")
        _set(model, name, new)
        resized.append(name)
    return resized
