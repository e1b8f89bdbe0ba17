"""Intermediate-layer objectives: SLIM's PGD-CS attack and SLIM training's diversified attack share them.

`feature_objective(layer, clean)` makes a PGD objective that maximises 1 - cos(f_l(x'), f_l(x)) at the named
module, optionally added (with a weight, possibly negative) to an output loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NenniError
from .pgd import Objective


def module_named(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise NenniError(f"no layer named {name!r} in the model (see `nenni info` for layer names)")
    return modules[name]


@contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores the named modules' outputs (with their graph) by name."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = module_named(model, name)

        def hook(_m, _inp, out, name=name):
            store[name] = out

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def features(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The named module's output for x (no graph)."""
    with torch.no_grad(), capture(model, [name]) as store:
        model(x)
    return store[name].detach()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cos between flattened feature maps."""
    return 1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


def feature_objective(layer: str, clean: torch.Tensor, weight: float = 1.0, base: Objective | None = None) -> Objective:
    """weight * (1 - cos(f_layer(x'), clean)) [+ base(model, x', y)]: clean features are constants."""
    clean = clean.detach()

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with capture(model, [layer]) as store:
            output_loss = base(model, x, y) if base is not None else None
            if layer not in store:  # the base loss did not run the model (or there is none)
                model(x)
        term = weight * cosine_distance(store[layer], clean)
        return term if output_loss is None else output_loss + term

    return objective
