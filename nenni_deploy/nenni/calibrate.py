"""The calibration stage as one function: convert a dense model, fit it, measure accuracy and cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..metrics import accuracy
from .config import LayerSpec, NenniConfig
from .convert import apply_plan, conversion_plan
from .cost import cost_report
from .fit import LayerFit, fit
from .layers import set_mode


@dataclass
class Calibration:
    model: nn.Module
    specs: list[LayerSpec]
    dense_layers: list[dict[str, str]]  # the layers left dense, and why
    fits: list[LayerFit]
    dense_accuracy: float
    nenni_accuracy: float
    fit_seconds: float
    cost: dict
    extra: dict = field(default_factory=dict)


def calibration_batches(x: torch.Tensor, n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """A seeded random subset of n training images, in batches."""
    n = min(n, len(x))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    sub = x[idx]
    return [sub[i : i + batch_size] for i in range(0, n, batch_size)]


def calibrate(
    model: nn.Module,
    config: NenniConfig,
    calib_x: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    calib_n: int = 2048,
    batch_size: int = 256,
    progress: bool = True,
) -> Calibration:
    """Dense accuracy, conversion, layer-by-layer fitting, NENNI accuracy and cost, on the given tensors."""
    model.eval()
    plan = conversion_plan(model, config)  # first: a setting that cannot apply fails before any long evaluation
    # The model as given (before batch norm is folded): the accuracy its owner measures.
    dense_acc = accuracy(model, test_x, test_y, batch_size, "dense accuracy" if progress else None)
    specs = apply_plan(model, plan)
    set_mode(model, "exact")
    batches = calibration_batches(calib_x, calib_n, batch_size, config.seed)
    start = time.perf_counter()
    fits = fit(model, batches, ridge=config.ridge, progress=progress)
    fit_seconds = time.perf_counter() - start
    set_mode(model, "nenni")
    nenni_acc = accuracy(model, test_x, test_y, batch_size, "NENNI accuracy" if progress else None)
    cost = cost_report(model, tuple(test_x.shape[1:]))
    return Calibration(model, specs, plan.dense, fits, dense_acc, nenni_acc, fit_seconds, cost)
