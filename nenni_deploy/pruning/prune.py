"""Static channel pruning with torch-pruning, to a MAC budget: the baseline a user would pick instead of NENNI.

torch-pruning's DependencyGraph groups every layer whose channels must go together (a conv, its batch norm,
the next conv's input, residual partners) and prunes each group by an importance score (L1 magnitude or
first-order Taylor). One pruning ratio for every group is searched by bisection until the model's MACs,
counted by nenni/cost.py like every other model here, are within the budget.

The classifier is never pruned. Where the graph does not follow a residual shortcut (the parameter-free
zero-padding "option A" shortcut of the CIFAR ResNets is a slice and a pad that torch-pruning does not trace
as a dependency), pruning the branch that feeds an addition leaves the addition with mismatched shapes. The
pruned model is therefore run and its output shape checked; if that fails, pruning falls back to the
convolutions whose output reaches no residual addition (in a basic block: the first conv), and says so.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import NenniError
from ..nenni.cost import layer_costs

IMPORTANCES = ("l1", "taylor")
SCAN_STEP = 0.05
PROBE_RATIOS = (0.3, 0.6, 0.9)  # where the dependency graph must give a model that runs
MODES = ("dependency-graph", "non-residual")
# Modules a channel passes through unchanged on its way to the next layer (elementwise, per-channel).
_CHANNELWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d)
_CHANNELWISE_FUNCS = {F.relu, torch.relu, F.relu6, F.max_pool2d, F.avg_pool2d, torch.nn.functional.dropout}


@dataclass
class PruneConfig:
    budget_macs: float  # fraction of the dense model's MACs
    importance: str = "l1"
    taylor_images: int = 256  # training images whose loss gradient ranks channels for "taylor"
    max_ratio: float = 0.95  # largest per-group pruning ratio tried
    search_steps: int = 6  # bisection steps after the scan
    seed: int = 0
    # Keep every pruned width a multiple of this: ORT's CPU convolutions use a blocked channel layout (NCHWc,
    # 8 channels on AVX2, 16 on AVX-512) only for inputs of whole blocks or multiples of 4 channels; widths
    # like 11, 22, 45 fall back to plain convolutions with layout reorders around them (runtime/layout.py).
    # TensorRT's tensor cores want multiples of 8 (fp16) and 32 (int8) too; TensorRT Model Optimizer's FastNAS
    # rounds to 32 by default. 1 (or None) = the exact widths the ratio gives.
    round_to: int | None = 8

    @property
    def multiple(self) -> int | None:
        """The multiple the widths keep, None for exact widths."""
        return self.round_to if self.round_to and self.round_to > 1 else None

    def __post_init__(self) -> None:
        if self.round_to is not None and not (isinstance(self.round_to, int) and self.round_to >= 1):
            raise NenniError(f"--round-to must be a positive whole number of channels, got {self.round_to!r}")
        if self.importance not in IMPORTANCES:
            raise NenniError(f"--importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if not (isinstance(self.budget_macs, (int, float)) and math.isfinite(self.budget_macs)):
            raise NenniError(f"--budget-macs must be a number, got {self.budget_macs!r}")
        if not 0 < self.budget_macs < 1:
            raise NenniError(f"--budget-macs must be in (0, 1) (a fraction of the dense MACs), got {self.budget_macs}")
        if self.taylor_images < 1:
            raise NenniError(f"--taylor-images must be >= 1, got {self.taylor_images}")


@dataclass
class PruneResult:
    model: nn.Module
    mode: str  # "dependency-graph" or "non-residual" (the fallback)
    note: str
    pruning_ratio: float  # the per-group ratio the search settled on
    macs_dense: int
    macs_pruned: int
    params_dense: int
    params_pruned: int
    output_shape: tuple[int, ...]
    round_to: int | None = None
    layers: dict[str, list[int]] = field(default_factory=dict)  # name -> [out channels before, after]

    @property
    def macs_ratio(self) -> float:
        return self.macs_pruned / self.macs_dense

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "note": self.note,
            "pruning_ratio": self.pruning_ratio,
            "round_to": self.round_to,
            "macs_dense": self.macs_dense,
            "macs_pruned": self.macs_pruned,
            "macs_ratio": self.macs_ratio,
            "bitops_ratio": self.macs_ratio,  # every layer stays at the same bit widths
            "params_dense": self.params_dense,
            "params_pruned": self.params_pruned,
            "output_shape": list(self.output_shape),
            "layers": self.layers,
        }


def total_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Per-image conv and linear MACs as nenni/cost.py counts a dense model."""
    return int(sum(r.macs_dense for r in layer_costs(model, tuple(input_shape))))


def classifier(model: nn.Module) -> nn.Module:
    """The last linear layer (else the last conv): its outputs are the classes and are never pruned."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)] or [
        m for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    if not layers:
        raise NenniError("the model has no conv or linear layer to prune")
    return layers[-1]


def residual_reaching(model: nn.Module) -> set[str]:
    """Names of the convs and linears whose output, through channelwise layers, does anything but feed one
    conv or linear: it reaches an addition, a concatenation, the output, or several users (a skip path)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the user needs one line
        raise NenniError(f"cannot analyse the model with torch.fx ({type(exc).__name__}: {exc})") from None
    out: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            continue
        if not _feeds_one_layer(gm, node):
            out.add(node.target)
    return out


def _feeds_one_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    while True:
        if len(node.users) != 1:
            return False
        (user,) = node.users
        if user.op == "call_module":
            mod = gm.get_submodule(user.target)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                return isinstance(mod, nn.Conv2d) and mod.groups == 1 or isinstance(mod, nn.Linear)
            if isinstance(mod, _CHANNELWISE):
                node = user
                continue
            return False
        if user.op == "call_function" and user.target in _CHANNELWISE_FUNCS:
            node = user
            continue
        return False


def _importance(name: str):
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1)


@functools.cache
def _pruner_class() -> type:
    import torch_pruning as tp

    class NearestMultiplePruner(tp.pruner.MetaPruner):
        """torch-pruning floors a rounded width (a 16-channel layer asked to lose one channel loses eight, and a
        budget of 0.8 lands at 0.7); the nearest multiple, at least one, keeps budgets reachable."""

        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            kept = max(round_to, round((current_channels - n_pruned) / round_to) * round_to)
            return max(current_channels - kept, 0)

    return NearestMultiplePruner


def _prune_copy(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    importance: str,
    ignored_names: set[str],
    taylor_batch: tuple[torch.Tensor, torch.Tensor] | None,
    round_to: int | None,
) -> nn.Module:
    pruned = copy.deepcopy(model).eval()
    ignored = [classifier(pruned), *(m for n, m in pruned.named_modules() if n in ignored_names)]
    pruner = _pruner_class()(
        pruned,
        example,
        importance=_importance(importance),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
    )
    if importance == "taylor":
        xb, yb = taylor_batch
        pruned.zero_grad()
        F.cross_entropy(pruned(xb), yb).backward()
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def _runs(model: nn.Module, example: torch.Tensor, expected: tuple[int, ...]) -> bool:
    try:
        with torch.no_grad():
            return tuple(model(example).shape) == expected
    except RuntimeError:
        return False


def prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, config: PruneConfig) -> PruneResult:
    """Prune a copy of `model` (plain conv/linear/batch-norm layers) to `config.budget_macs` of its MACs.

    `x` (and `y` for Taylor importance) are training images: one for the graph trace, `taylor_images` for the
    gradients. The returned model runs and has the dense model's output shape, or this raises a NenniError.
    """
    model = model.eval()
    input_shape = tuple(x.shape[1:])
    example = x[:1]
    with torch.no_grad():
        expected = tuple(model(example).shape)
    taylor_batch = None
    if config.importance == "taylor":
        if y is None:
            raise NenniError("Taylor importance needs labelled training images")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed))[: config.taylor_images]
        taylor_batch = (x[idx], y[idx])
    dense_macs = total_macs(model, input_shape)

    def runs_at(ratios: tuple[float, ...], ignored: set[str]) -> bool:
        # several ratios: with rounding, a light one can leave the group that breaks a shortcut whole
        return all(
            _runs(_prune_copy(model, example, r, config.importance, ignored, taylor_batch, config.multiple), example,
                  expected)
            for r in ratios
        )  # fmt: skip

    mode, ignored, note = MODES[0], set(), "torch-pruning's dependency graph over every conv"
    if not runs_at(PROBE_RATIOS, ignored):
        mode, ignored = MODES[1], residual_reaching(model)
        note = (
            "the dependency graph breaks a residual shortcut it does not trace (the pruned model does not run); "
            f"pruned only the convolutions whose output reaches no residual addition ({len(ignored)} left whole)"
        )
        if not runs_at(PROBE_RATIOS[:1], ignored):
            raise NenniError(
                "torch-pruning could not prune this model into one that runs, even without its residual-feeding layers"
            )

    def trial(ratio: float) -> tuple[nn.Module, int]:
        m = _prune_copy(model, example, ratio, config.importance, ignored, taylor_batch, config.multiple)
        if not _runs(m, example, expected):
            raise NenniError(f"the model pruned at ratio {ratio:.3f} does not run or changes the output shape")
        return m, total_macs(m, input_shape)

    # MACs do not fall monotonically with the ratio everywhere (torch-pruning leaves a group alone that the
    # ratio would empty), so a coarse scan finds the first ratio that meets the budget, then bisection refines.
    target = config.budget_macs * dense_macs
    found, lo, least = None, 0.0, dense_macs
    for i in range(1, int(config.max_ratio / SCAN_STEP) + 1):
        ratio = i * SCAN_STEP
        m, macs = trial(ratio)
        least = min(least, macs)
        if macs <= target:
            found = (m, macs, ratio)
            break
        lo = ratio
    if found is None:
        raise NenniError(
            f"--budget-macs {config.budget_macs:g} cannot be met by {mode} pruning: at most "
            f"{1 - least / dense_macs:.1%} fewer MACs ({least / dense_macs:.3f} of dense)"
            + (
                f" with widths in multiples of {config.multiple} (--round-to 1 allows any width)"
                if config.multiple
                else ""
            )
        )
    best, best_macs, hi = found
    best_ratio = hi
    for _ in range(config.search_steps):  # the least pruning that meets the budget
        mid = (lo + hi) / 2
        m, macs = trial(mid)
        if macs <= target:
            hi, best, best_macs, best_ratio = mid, m, macs, mid
        else:
            lo = mid
    before = {n: _out_channels(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    after = {n: _out_channels(m) for n, m in best.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return PruneResult(
        model=best,
        mode=mode,
        note=note,
        pruning_ratio=best_ratio,
        macs_dense=dense_macs,
        macs_pruned=best_macs,
        params_dense=sum(p.numel() for p in model.parameters()),
        params_pruned=sum(p.numel() for p in best.parameters()),
        output_shape=expected[1:],
        round_to=config.multiple,
        layers={n: [before[n], after[n]] for n in before if n in after},
    )


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
