"""Closed-form fitting of the approximators, layer by layer in network order.

Each layer sees the inputs that the already-converted earlier layers produce, so the fit matches inference.
The normal equations are accumulated in float64 batch by batch: memory is O(k^2 + k n) per layer whatever
the number of calibration images.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .layers import NenniLayer, nenni_layers
from .selection import ranking_score


class _Stop(Exception):
    """Raised by a hook once the layer being fitted has seen its input: the rest of the network is not needed."""


@dataclass
class NormalEquations:
    """Running sums for ridge regression of targets z (N x n) on features [u, 1] (N x (k+1))."""

    gram: torch.Tensor  # (k+1, k+1)
    cross: torch.Tensor  # (k+1, n)
    target_sq: torch.Tensor  # (n,) sum z^2
    target_sum: torch.Tensor  # (n,)
    count: int = 0

    @classmethod
    def zeros(cls, k: int, n: int) -> NormalEquations:
        f64 = torch.float64
        return cls(torch.zeros(k + 1, k + 1, dtype=f64), torch.zeros(k + 1, n, dtype=f64),
                   torch.zeros(n, dtype=f64), torch.zeros(n, dtype=f64))

    def add(self, u: torch.Tensor, z: torch.Tensor) -> None:
        u = torch.cat([u.double(), torch.ones(u.shape[0], 1, dtype=torch.float64)], dim=1)
        z = z.double()
        self.gram += u.T @ u
        self.cross += u.T @ z
        self.target_sq += (z * z).sum(0)
        self.target_sum += z.sum(0)
        self.count += u.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge solution (W~ of shape (n, k), b~ of shape (n,)); the penalty is relative and spares the bias."""
        k = self.gram.shape[0] - 1
        diag = torch.diagonal(self.gram)[:k]
        penalty = torch.zeros(k + 1, dtype=torch.float64)
        penalty[:k] = ridge * diag.mean().clamp_min(1e-12)
        sol = torch.linalg.solve(self.gram + torch.diag(penalty), self.cross)  # (k+1, n)
        return sol[:k].T.contiguous(), sol[k].contiguous()

    def sse(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Per-output sum of squared residuals of any (W~, b~), from the running sums alone."""
        sol = torch.cat([weight.double().T, bias.double()[None]], dim=0)  # (k+1, n)
        return self.target_sq - 2 * (sol * self.cross).sum(0) + (sol * (self.gram @ sol)).sum(0)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C); (B, C) stays."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if t.dim() == 4 else t


@dataclass
class LayerFit:
    name: str
    rows: int
    rel_error: float  # ||z - z~|| / ||z - mean(z)||, after quantisation of W~
    residual_rms: float
    seconds: float


def _run_until(model: nn.Module, layer: nn.Module, batches: Iterable[torch.Tensor], on_input) -> None:
    def hook(_mod, args):
        on_input(args[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for xb in batches:
                try:
                    model(xb)
                except _Stop:
                    pass
    finally:
        handle.remove()


def fit_layer(model: nn.Module, layer: NenniLayer, batches: list[torch.Tensor], ridge: float) -> LayerFit:
    start = time.perf_counter()
    spec = layer.spec
    eqs = NormalEquations.zeros(spec.proj_dim, spec.out_dim)
    layer.mode = "exact"

    def accumulate(x: torch.Tensor) -> None:
        eqs.add(_rows(layer.project(x)), _rows(layer.exact(x)))

    _run_until(model, layer, batches, accumulate)
    weight, bias = eqs.solve(ridge)
    with torch.no_grad():
        layer.approx_weight.copy_(weight.float())
        layer.approx_bias.copy_(bias.float())
        sse = eqs.sse(layer.quantized_approx_weight(), layer.approx_bias).clamp_min(0)
        centred = (eqs.target_sq - eqs.target_sum**2 / eqs.count).clamp_min(1e-12)
        rel = float(torch.sqrt(sse.sum() / centred.sum()))
        rms = float(torch.sqrt(sse.sum() / (eqs.count * spec.out_dim)))
        layer.residual_rms.fill_(rms)
    spec.fit_rel_error, spec.residual_rms = rel, rms
    if spec.granularity == "threshold":
        spec.threshold = _calibrate_threshold(model, layer, batches[: max(1, len(batches) // 4)])
    layer.mode = "nenni"
    return LayerFit(spec.name, eqs.count, rel, rms, time.perf_counter() - start)


def _calibrate_threshold(model: nn.Module, layer: NenniLayer, batches: list[torch.Tensor]) -> float:
    """The score quantile that marks the target fraction of neurons essential on calibration data."""
    scores: list[torch.Tensor] = []
    _run_until(model, layer, batches, lambda x: scores.append(ranking_score(layer.predict(x), layer.spec.rank).flatten()))
    flat = torch.cat(scores)
    if flat.numel() > 4_000_000:  # torch.quantile's input limit; a strided subsample is plenty
        flat = flat[:: flat.numel() // 4_000_000 + 1]
    return float(torch.quantile(flat.float(), 1.0 - layer.spec.ratio))


def fit(model: nn.Module, batches: list[torch.Tensor], ridge: float = 1e-4, progress: bool = True) -> list[LayerFit]:
    """Fit every NENNI layer in network order; earlier layers run as NENNI while later ones are fitted."""
    from tqdm.auto import tqdm

    model.eval()
    for layer in nenni_layers(model).values():
        layer.mode = "exact"
    layers = _execution_order(model, batches[0][:1])
    results = []
    bar = tqdm(layers.items(), desc="fitting", unit="layer", disable=not progress)
    for name, layer in bar:
        bar.set_postfix_str(name)
        results.append(fit_layer(model, layer, batches, ridge))
    return results


def _execution_order(model: nn.Module, sample: torch.Tensor) -> dict[str, NenniLayer]:
    layers = nenni_layers(model)
    order: list[str] = []
    names = {id(m): n for n, m in layers.items()}
    handles = [m.register_forward_pre_hook(lambda mod, _a: order.append(names[id(mod)])) for m in layers.values()]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return {n: layers[n] for n in dict.fromkeys(order)}
