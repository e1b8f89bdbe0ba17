"""Keeping NENNI approximators in step with base weights that are being trained."""

from __future__ import annotations

import torch
from torch import nn

from ..nenni import fit as nenni_fit
from ..nenni.layers import NenniLayer, nenni_layers


def calibration_batches(x: torch.Tensor, n: int, batch_size: int) -> list[torch.Tensor]:
    x = x[:n]
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def refit_approximators(model: nn.Module, batches: list[torch.Tensor], ridge: float) -> None:
    """Closed-form refit of every approximator against the current base weights (leaves the model in eval)."""
    nenni_fit.fit(model, batches, ridge=ridge, progress=False)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): one row per output position, as the fit sees them."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if t.dim() == 4 else t


class _Residuals:
    """Float64 running sums of z, z^2 and (z - z~)^2 for one layer."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.sum = None
        self.sq = None
        self.rows = 0

    def add(self, z: torch.Tensor, pred: torch.Tensor) -> None:
        z, pred = _rows(z).double(), _rows(pred).double()
        self.sse += float(((z - pred) ** 2).sum())
        s, q = z.sum(0), (z * z).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        self.rows += z.shape[0]


@torch.no_grad()
def measure_fit(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Re-measure each layer's residual RMS and relative fit error with the current weights, and store them.

    Training moves both the base weights and the approximators, so the statistics written at fit time go
    stale; the residual RMS sets the noise level of `gaussian` models, so it must follow the weights. Every
    layer sees the inputs the NENNI model produces in inference (one forward pass, all layers in NENNI mode).
    """
    layers = nenni_layers(model)
    stats = {name: _Residuals() for name in layers}

    def hook(name: str, layer: NenniLayer):
        def run(_mod, args):
            x = args[0]
            stats[name].add(layer.exact(x), layer.predict(x))

        return run

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    model.eval()
    try:
        for xb in batches:
            model(xb)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, layer in layers.items():
        s = stats[name]
        if s.rows == 0:
            continue  # the layer did not run (an unused branch): keep its old numbers
        n = layer.spec.out_dim
        centred = float((s.sq - s.sum**2 / s.rows).clamp_min(1e-12).sum())
        rms = (s.sse / (s.rows * n)) ** 0.5
        rel = (s.sse / centred) ** 0.5
        layer.residual_rms.fill_(rms)
        layer.spec.residual_rms, layer.spec.fit_rel_error = rms, rel
        out[name] = {"residual_rms": rms, "fit_rel_error": rel}
    return out
