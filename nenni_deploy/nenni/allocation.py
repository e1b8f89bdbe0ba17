"""Accuracy-aware allocation: a per-layer essential ratio and projection size k under a global compute budget.

1. Sensitivity: for every eligible layer and every candidate (ratio, k), the cross-entropy loss (and accuracy)
   on a few hundred training images with only that layer converted (its approximator fitted on exact inputs).
2. Cost: each candidate's MACs or BitOPs from `cost.layer_costs`, the same accounting every report uses, so the
   chosen allocation's cost is exactly what `nenni info` and the export metadata state.
3. Choice: a multiple-choice knapsack (one option per layer, "dense" always among them) minimising the summed
   loss increase, the additive proxy for accuracy, subject to total cost <= budget * dense cost. Options that
   cost no less than the dense layer are dropped (too small to pay), and so are options whose loss increase
   exceeds `max_loss_increase` (too sensitive): such layers stay dense.

Measurements are cached in JSON keyed by a hash of the dense model's tensors; a cache measured on another
model is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NenniError
from ..files import atomic_output
from .config import NenniConfig, resolve_proj_dim
from .convert import analyse, convert, eligible
from .cost import layer_costs
from .fit import fit
from .layers import nenni_layers

METRICS = ("macs", "bitops")
RATIO_GRANULARITIES = ("channel", "element")
REFIT_IMAGES = 2048  # training images the reallocated approximators are fitted on
REFIT_BATCH = 256
CACHE_FORMAT = "nenni-sensitivity"
KNAPSACK_UNITS = 4000  # cost resolution of the knapsack; costs round up, so the budget always holds


@dataclass
class AllocationConfig:
    budget: float  # fraction of the dense model's total cost
    metric: str = "macs"  # "macs" or "bitops", as nenni/cost.py counts them
    ratios: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    proj_dims: tuple[str, ...] = ("n/8", "n/4")
    images: int = 512  # training images the sensitivity is measured on
    batch_size: int = 256
    seed: int = 0
    max_loss_increase: float | None = None  # options above it are never chosen
    cache: str | None = None  # JSON file: read if it fits this model and these settings, written otherwise

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise NenniError(f"budget metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and 0 < self.budget <= 1):
            raise NenniError(
                f"--budget-{self.metric} must be in (0, 1] (a fraction of the dense cost), got {self.budget}"
            )
        if not self.ratios or not all(0 < r < 1 for r in self.ratios):
            raise NenniError(f"candidate ratios must be in (0, 1), got {list(self.ratios)}")
        if not self.proj_dims:
            raise NenniError("at least one candidate projection size is needed")
        if self.images < 1:
            raise NenniError(f"sensitivity images must be >= 1, got {self.images}")
        self.ratios = tuple(sorted(float(r) for r in self.ratios))
        self.proj_dims = tuple(str(k) for k in self.proj_dims)

    def measurement_key(self) -> dict[str, Any]:
        """The settings a cached measurement must share to be reused."""
        return {
            "ratios": list(self.ratios),
            "proj_dims": list(self.proj_dims),
            "images": self.images,
            "seed": self.seed,
        }


@dataclass
class LayerChoice:
    name: str
    ratio: float | None  # None: stays dense
    proj_dim: int | None
    proj_dim_spec: str | None
    cost: int
    dense_cost: int
    loss_increase: float
    accuracy_drop: float

    @property
    def converted(self) -> bool:
        return self.ratio is not None


@dataclass
class AllocationResult:
    metric: str
    budget: float
    cost_ratio: float  # chosen total / dense total, per nenni/cost.py
    dense_cost: int
    chosen_cost: int
    fixed_cost: int  # layers that are never converted (first conv, classifier, ...)
    dense_loss: float
    dense_accuracy: float
    predicted_loss: float  # dense loss + summed increases
    predicted_accuracy: float  # dense accuracy - summed drops (rough: drops are not additive)
    images: int
    layers: list[LayerChoice] = field(default_factory=list)
    cache: str | None = None
    cache_hit: bool = False

    def chosen(self) -> list[LayerChoice]:
        return [c for c in self.layers if c.converted]

    def nenni_config(self, base: NenniConfig) -> NenniConfig:
        """The base settings restricted to the converted layers, with their ratios and k (exact names as patterns)."""
        chosen = self.chosen()
        return dataclasses.replace(
            base,
            include=[c.name for c in chosen] or ["<none>"],
            exclude=[],
            ratios={c.name: c.ratio for c in chosen},
            proj_dims={c.name: str(c.proj_dim) for c in chosen},
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(c) for c in self.layers]
        return d


def model_hash(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict, by name: what a sensitivity cache belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dense_base(model: nn.Module) -> nn.Module:
    """A copy with every NENNI layer replaced by its exact layer (the folded dense base)."""
    model = copy.deepcopy(model)
    for name, layer in list(nenni_layers(model).items()):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.exact)
    return model.eval()


def _subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: min(n, len(x))]
    return x[idx], y[idx]


@torch.no_grad()
def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        loss += float(F.cross_entropy(logits, y[i : i + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    return loss / len(x), 100.0 * correct / len(x)


def measure_sensitivity(
    dense: nn.Module, base: NenniConfig, x: torch.Tensor, y: torch.Tensor, config: AllocationConfig
) -> dict[str, Any]:
    """Loss and accuracy with one layer converted at a time, for every candidate (k, ratio); plus the costs.

    `dense` is a plain or folded model (no NENNI layers). Returns the JSON-ready measurement.
    """
    xs, ys = _subset(x, y, config.images, config.seed)
    batches = [xs[i : i + config.batch_size] for i in range(0, len(xs), config.batch_size)]
    input_shape = tuple(x.shape[1:])
    dense_loss, dense_acc = _loss_acc(dense.eval(), xs, ys, config.batch_size)
    dense_rows = {r.name: r for r in layer_costs(dense, input_shape)}
    layers: dict[str, dict[str, Any]] = {}
    for k_spec in config.proj_dims:
        model = copy.deepcopy(dense)
        # Fitted at ratio 1 (every neuron exact): each approximator sees the exact inputs of the dense network.
        convert(model, dataclasses.replace(base, ratio=1.0, ratios={}, proj_dims={}, proj_dim=k_spec))
        fit(model, batches, ridge=base.ridge, progress=False)
        converted = nenni_layers(model)
        for layer in converted.values():
            layer.mode = "exact"
        for ratio in config.ratios:
            for layer in converted.values():
                layer.spec = dataclasses.replace(layer.spec, ratio=ratio)
            costs = {r.name: r for r in layer_costs(model, input_shape)}
            for name, layer in converted.items():
                layer.mode = "nenni"
                loss, acc = _loss_acc(model, xs, ys, config.batch_size)
                layer.mode = "exact"
                entry = layers.setdefault(name, {"options": []})
                entry["options"].append(
                    {
                        "proj_dim_spec": k_spec,
                        "proj_dim": layer.spec.proj_dim,
                        "ratio": ratio,
                        "macs": costs[name].macs_nenni,
                        "bitops": costs[name].bitops_nenni,
                        "loss": loss,
                        "accuracy": acc,
                    }
                )
    return {
        "format": CACHE_FORMAT,
        "model_sha256": model_hash(dense),
        "granularity": base.granularity,
        "settings": config.measurement_key(),
        "dense_loss": dense_loss,
        "dense_accuracy": dense_acc,
        "dense_costs": {n: {"macs": r.macs_dense, "bitops": r.bitops_dense} for n, r in dense_rows.items()},
        "layers": layers,
    }


def _read_cache(path: Path, digest: str, granularity: str, config: AllocationConfig) -> dict[str, Any] | None:
    """The cached measurement if it belongs to this model and these settings; None to measure anew."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NenniError(f"sensitivity cache {path} is unreadable ({exc})") from None
    if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT:
        raise NenniError(f"{path} is not a sensitivity cache")
    if cached.get("model_sha256") != digest:
        raise NenniError(f"sensitivity cache {path} was measured on another model (its weights hash differs)")
    if cached.get("settings") != config.measurement_key() or cached.get("granularity") != granularity:
        return None
    return cached


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")


def allocate(
    model: nn.Module, base: NenniConfig, x: torch.Tensor, y: torch.Tensor, config: AllocationConfig
) -> AllocationResult:
    """Choose per-layer ratio and k for `model` (dense, folded, or converted: its dense base is used).

    The eligible layers are `base`'s (include/exclude); its granularity must select by ratio.
    """
    if base.granularity not in RATIO_GRANULARITIES:
        raise NenniError(
            f"budget allocation needs a ratio granularity ({', '.join(RATIO_GRANULARITIES)}), not {base.granularity}"
        )
    dense = dense_base(model)
    digest = model_hash(dense)
    cache = Path(config.cache) if config.cache else None
    measured = _read_cache(cache, digest, base.granularity, config) if cache else None
    hit = measured is not None
    if measured is None:
        _check_candidates(dense, base, config)
        measured = measure_sensitivity(dense, base, x, y, config)
        if cache:
            _write_json(cache, measured)
    return choose(measured, config, cache=str(cache) if cache else None, cache_hit=hit)


def _check_candidates(dense: nn.Module, base: NenniConfig, config: AllocationConfig) -> None:
    """A bad --proj-dim candidate fails here, in a second, not after the first measurement."""
    infos, _ = eligible(analyse(dense), base)
    if not infos:
        raise NenniError("no eligible layer to allocate")
    for info in infos[:1]:
        w = info.module.weight
        for k in config.proj_dims:
            resolve_proj_dim(k, int(w.shape[0]), int(w[0].numel()))


def choose(measured: dict[str, Any], config: AllocationConfig, **extra: Any) -> AllocationResult:
    """The knapsack over the measured options; a budget below the cheapest allocation is a one-line error."""
    metric = config.metric
    dense_costs = {n: int(c[metric]) for n, c in measured["dense_costs"].items()}
    total_dense = sum(dense_costs.values())
    layers = measured["layers"]
    fixed = sum(c for n, c in dense_costs.items() if n not in layers)
    capacity = config.budget * total_dense - fixed
    dense_loss, dense_acc = measured["dense_loss"], measured["dense_accuracy"]
    # Per layer: option 0 is dense; the rest are the candidates that pay and are not too sensitive.
    options: list[list[dict[str, Any]]] = []
    names = list(layers)
    for name in names:
        opts = [
            {
                "ratio": None,
                "proj_dim": None,
                "proj_dim_spec": None,
                "cost": dense_costs[name],
                "loss": dense_loss,
                "accuracy": dense_acc,
            }
        ]
        for o in layers[name]["options"]:
            if o[metric] >= dense_costs[name]:
                continue
            if config.max_loss_increase is not None and o["loss"] - dense_loss > config.max_loss_increase:
                continue
            opts.append({**o, "cost": int(o[metric])})
        options.append(opts)
    cheapest = fixed + sum(min(o["cost"] for o in opts) for opts in options)
    if cheapest > config.budget * total_dense:
        raise NenniError(
            f"--budget-{metric} {config.budget:g} cannot be met: the cheapest allocation (every layer at its "
            f"smallest ratio and k, approximators included) costs {cheapest / total_dense:.3f} of dense"
        )
    picks = _knapsack(options, capacity, dense_loss)
    if picks is None:  # rounding the costs up left no room: the cheapest allocation itself fits exactly
        picks = [min(range(len(opts)), key=lambda i, o=opts: o[i]["cost"]) for opts in options]
    choices = []
    for name, opts, i in zip(names, options, picks, strict=True):
        o = opts[i]
        choices.append(
            LayerChoice(
                name=name,
                ratio=o["ratio"],
                proj_dim=o["proj_dim"],
                proj_dim_spec=o["proj_dim_spec"],
                cost=o["cost"],
                dense_cost=dense_costs[name],
                loss_increase=o["loss"] - dense_loss,
                accuracy_drop=dense_acc - o["accuracy"],
            )
        )
    chosen_cost = fixed + sum(c.cost for c in choices)
    return AllocationResult(
        metric=metric,
        budget=config.budget,
        cost_ratio=chosen_cost / total_dense,
        dense_cost=total_dense,
        chosen_cost=chosen_cost,
        fixed_cost=fixed,
        dense_loss=dense_loss,
        dense_accuracy=dense_acc,
        predicted_loss=dense_loss + sum(c.loss_increase for c in choices),
        predicted_accuracy=dense_acc - sum(c.accuracy_drop for c in choices),
        images=config.images,
        layers=choices,
        **extra,
    )


def _knapsack(options: list[list[dict[str, Any]]], capacity: float, dense_loss: float) -> list[int] | None:
    """Multiple-choice knapsack by dynamic programming over costs rounded up to KNAPSACK_UNITS of the capacity."""
    if capacity <= 0:
        return None
    unit = capacity / KNAPSACK_UNITS
    inf = float("inf")
    best = np.full(KNAPSACK_UNITS + 1, inf)
    best[0] = 0.0
    back: list[np.ndarray] = []
    for opts in options:
        new = np.full_like(best, inf)
        arg = np.full(best.shape, -1, dtype=np.int64)
        for i, o in enumerate(opts):
            w = math.ceil(o["cost"] / unit - 1e-9)
            if w > KNAPSACK_UNITS:
                continue
            cand = np.full_like(best, inf)
            cand[w:] = best[: len(best) - w] + (o["loss"] - dense_loss)
            better = cand < new
            new[better], arg[better] = cand[better], i
        best = new
        back.append(arg)
    end = int(np.argmin(best))
    if not math.isfinite(best[end]):
        return None
    picks = []
    for opts, arg in zip(reversed(options), reversed(back), strict=True):
        i = int(arg[end])
        picks.append(i)
        end -= math.ceil(opts[i]["cost"] / unit - 1e-9)
    return picks[::-1]


def format_allocation(result: AllocationResult) -> str:
    lines = [
        f"allocation under --budget-{result.metric} {result.budget:g}: {result.cost_ratio:.3f} of dense "
        f"{result.metric.upper()} ({len(result.chosen())} of {len(result.layers)} layers converted; sensitivity on "
        f"{result.images} images{', cached' if result.cache_hit else ''})"
    ]
    for c in result.layers:
        what = f"ratio {c.ratio:g}, k {c.proj_dim}" if c.converted else "dense"
        lines.append(
            f"  {c.name:<24} {what:<20} cost {c.cost / max(1, c.dense_cost):.2f} of the layer, "
            f"loss +{c.loss_increase:.3f}"
        )
    return "\n".join(lines)


def reallocate(
    model: nn.Module, base: NenniConfig, config: AllocationConfig, x: torch.Tensor, y: torch.Tensor
) -> tuple[nn.Module, NenniConfig, AllocationResult]:
    """Allocate under the budget from `model`'s dense base, then convert a fresh copy and fit it: (model, config,
    result). Deterministic for the same inputs, so a resumed run rebuilds the structure its checkpoint holds."""
    from .calibrate import calibration_batches

    result = allocate(model, base, x, y, config)
    if not result.chosen():
        raise NenniError(f"the budget {config.budget:g} leaves every layer dense: nothing to fine-tune")
    chosen = result.nenni_config(base)
    new = dense_base(model)
    convert(new, chosen)
    fit(new, calibration_batches(x, REFIT_IMAGES, REFIT_BATCH, chosen.seed), ridge=chosen.ridge, progress=False)
    return new, chosen, result
