"""Closed-form fitting of the approximators, layer by layer in network order.

Each layer sees the inputs that the already-converted earlier layers produce, so the fit matches inference.
The normal equations are accumulated in float64 batch by batch: memory is O(k^2 + k n) per layer whatever
the number of calibration images.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .layers import NenniLayer, nenni_layers
from .selection import ranking_score


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
        return cls(
            torch.zeros(k + 1, k + 1, dtype=f64),
            torch.zeros(k + 1, n, dtype=f64),
            torch.zeros(n, dtype=f64),
            torch.zeros(n, dtype=f64),
        )

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


def fit_layer(layer: NenniLayer, inputs: Iterable[torch.Tensor], ridge: float) -> LayerFit:
    """Fit one layer from the inputs it receives (a re-iterable of one tensor per calibration batch).

    Leaves the layer in NENNI mode.
    """
    start = time.perf_counter()
    spec = layer.spec
    eqs = NormalEquations.zeros(spec.proj_dim, spec.out_dim)
    layer.mode = "exact"
    with torch.no_grad():
        for x in inputs:
            eqs.add(_rows(layer.project(x)), _rows(layer.exact(x)))
        weight, bias = eqs.solve(ridge)
        layer.approx_weight.copy_(weight.float())
        layer.approx_bias.copy_(bias.float())
        sse = eqs.sse(layer.quantized_approx_weight(), layer.approx_bias).clamp_min(0)
        centred = (eqs.target_sq - eqs.target_sum**2 / eqs.count).clamp_min(1e-12)
        rel = float(torch.sqrt(sse.sum() / centred.sum()))
        rms = float(torch.sqrt(sse.sum() / (eqs.count * spec.out_dim)))
        layer.residual_rms.fill_(rms)
    spec.fit_rel_error, spec.residual_rms = rel, rms
    if spec.granularity == "threshold":
        spec.threshold = _calibrate_threshold(layer, inputs)
    layer.mode = "nenni"
    return LayerFit(spec.name, eqs.count, rel, rms, time.perf_counter() - start)


def _calibrate_threshold(layer: NenniLayer, inputs: Iterable[torch.Tensor]) -> float:
    """The score quantile that marks the target fraction of neurons essential on calibration data."""
    with torch.no_grad():
        flat = torch.cat([ranking_score(layer.predict(x), layer.spec.rank).flatten() for x in inputs])
    if flat.numel() > 4_000_000:  # torch.quantile's input limit; a strided subsample is plenty
        flat = flat[:: flat.numel() // 4_000_000 + 1]
    return float(torch.quantile(flat.float(), 1.0 - layer.spec.ratio))


class _NenniLeafTracer(fx.Tracer):
    """Keeps NENNI layers as single call_module nodes, so the walk below can stop at each one."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, NenniLayer) or super().is_leaf_module(m, qualname)


def fit(
    model: nn.Module,
    batches: list[torch.Tensor],
    ridge: float = 1e-4,
    progress: bool = True,
    cache_images: int = 16384,
) -> list[LayerFit]:
    """Fit every NENNI layer in network order; each sees what the already-fitted earlier layers produce.

    Up to `cache_images` calibration images, the model's graph is walked node by node over the whole set,
    keeping each intermediate result only until its last user has run: one pass through the network. Beyond
    that, memory must not grow with the number of images, so each layer's inputs are recomputed batch by
    batch from the network's input (one partial pass per layer): slower, same result.
    """
    from tqdm.auto import tqdm

    model.eval()
    layers = nenni_layers(model)
    for layer in layers.values():
        layer.mode = "exact"
    graph = _NenniLeafTracer().trace(model)
    bar = tqdm(total=len(layers), desc="fitting", unit="layer", disable=not progress)

    def fit_one(layer: NenniLayer, inputs: Iterable[torch.Tensor]) -> LayerFit:
        bar.set_postfix_str(layer.spec.name)
        result = fit_layer(layer, inputs, ridge)
        bar.update()
        return result

    try:
        if sum(len(b) for b in batches) <= cache_images:
            return _fit_by_graph_walk(model, graph, batches, fit_one)
        order = [n.target for n in graph.nodes if n.op == "call_module" and n.target in layers]
        return [fit_one(layers[name], _Recomputed(model, layers[name], batches)) for name in dict.fromkeys(order)]
    finally:
        bar.close()


def _fit_by_graph_walk(model: nn.Module, graph: fx.Graph, batches: list[torch.Tensor], fit_one) -> list[LayerFit]:
    remaining = {node: len(node.users) for node in graph.nodes}
    env: dict[fx.Node, list] = {}
    results: list[LayerFit] = []
    with torch.no_grad():
        for node in graph.nodes:
            if node.op == "output":
                break
            if node.op == "placeholder":
                env[node] = list(batches)
                continue
            module = model.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, NenniLayer) and module.mode == "exact":
                results.append(fit_one(module, [args[0] for args, _ in _batch_args(node, env, len(batches))]))
            env[node] = [_run_node(model, node, a, kw) for a, kw in _batch_args(node, env, len(batches))]
            for used in node.all_input_nodes:
                remaining[used] -= 1
                if remaining[used] == 0:
                    del env[used]
    return results


class _StopForward(Exception):
    """Raised once the layer being fitted has seen its input: the rest of the network is not needed."""


class _Recomputed:
    """The inputs one layer receives, recomputed from the network input one batch at a time on each iteration."""

    def __init__(self, model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> None:
        self.model, self.layer, self.batches = model, layer, batches

    def __iter__(self):
        captured: list[torch.Tensor] = []

        def hook(_mod, args):
            captured.append(args[0])
            raise _StopForward

        for xb in self.batches:
            handle = self.layer.register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    self.model(xb)
            except _StopForward:
                pass
            finally:
                handle.remove()
            yield captured.pop()


def _batch_args(node: fx.Node, env: dict, count: int):
    for i in range(count):
        pick = functools.partial(_pick, env, i)
        yield fx.node.map_arg(node.args, pick), fx.node.map_arg(node.kwargs, pick)


def _pick(env: dict, i: int, node: fx.Node):
    return env[node][i]


def _run_node(model: nn.Module, node: fx.Node, args, kwargs):
    if node.op == "call_module":
        return model.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj = model
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise RuntimeError(f"unexpected graph node {node.op}")
