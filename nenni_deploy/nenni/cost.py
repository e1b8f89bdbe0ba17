"""MACs and BitOPs per layer and in total, dense vs NENNI (method.md 1.2), with the assumptions stated.

Dense layer, per output position: n * d MACs at b_w x b_a bits. NENNI layer per position: K * d exact MACs
(b_w x b_a), n * k approximator MACs (b_w~ x b_a), the projection's nonzeros as additions (b_a bits each),
and the selection counted separately. `macs_nenni` charges the projection as k * d dense floating-point MACs,
which is what it costs on hardware that does not exploit the ternary values; `bitops_nenni` charges additions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layers import NenniLayer
from .projection import nonzeros


@dataclass
class Assumptions:
    weight_bits: int = 8  # exact path W8A8 (the paper's default-like setting)
    act_bits: int = 8

    def describe(self, approx_bits: int) -> str:
        return (
            f"exact W{self.weight_bits}A{self.act_bits}, approximator W{approx_bits}A{self.act_bits}, "
            f"projection additions at {self.act_bits} bits; dense W{self.weight_bits}A{self.act_bits}"
        )


@dataclass
class LayerCost:
    name: str
    kind: str
    positions: int  # output positions per image (H' * W', or 1)
    in_dim: int
    out_dim: int
    proj_dim: int | None
    essential: int | None
    projection_density: float | None  # fraction of nonzero entries of P (ternary: ~1/3)
    macs_dense: int
    macs_exact: int
    macs_approx: int
    macs_projection: int  # charged as dense MACs
    adds_projection: int  # nonzeros only
    selection_ops: int  # comparisons, counted apart
    macs_nenni: int
    bitops_dense: int
    bitops_nenni: int


def _record_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Output positions per image of every conv / linear, from one forward pass on a dummy image."""
    positions: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, NenniLayer)) and not _inside_nenni(model, name):
            handles.append(
                mod.register_forward_hook(
                    lambda m, _i, out, name=name: positions.__setitem__(name, int(math.prod(out.shape[2:])) or 1)
                )
            )
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return positions


def _inside_nenni(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), NenniLayer)


def _selection_ops(layer: NenniLayer) -> int:
    """Per position: a top-K over n needs about n log2 K comparisons; N:M about n log2 N; threshold n."""
    s, n = layer.spec, layer.spec.out_dim
    if s.granularity == "threshold":
        return n
    if s.granularity == "nm":
        return int(n * max(1.0, math.log2(s.nm[0] + 1)))
    if s.granularity == "channel":
        return n  # the spatial mean; the per-sample top-K over n channels is added once per image below
    return int(n * max(1.0, math.log2(s.essential + 1)))


def layer_costs(
    model: nn.Module, input_shape: tuple[int, ...], assumptions: Assumptions | None = None
) -> list[LayerCost]:
    a = assumptions or Assumptions()
    positions = _record_positions(model, input_shape)
    rows: list[LayerCost] = []
    wa = a.weight_bits * a.act_bits
    for name, pos in positions.items():
        mod = model.get_submodule(name)
        if isinstance(mod, NenniLayer):
            s = mod.spec
            dense = pos * s.out_dim * s.in_dim
            exact = pos * s.essential * s.in_dim
            approx = pos * s.out_dim * s.proj_dim
            proj = pos * s.proj_dim * s.in_dim
            adds = pos * nonzeros(mod.proj)
            sel = pos * _selection_ops(mod) + (s.out_dim if s.granularity == "channel" else 0)
            rows.append(
                LayerCost(
                    name,
                    s.kind,
                    pos,
                    s.in_dim,
                    s.out_dim,
                    s.proj_dim,
                    s.essential,
                    nonzeros(mod.proj) / mod.proj.numel(),
                    dense,
                    exact,
                    approx,
                    proj,
                    adds,
                    sel,
                    exact + approx + proj,
                    dense * wa,
                    exact * wa + approx * min(s.approx_bits, 32) * a.act_bits + adds * a.act_bits,
                )
            )
        else:
            d = int(mod.weight[0].numel()) if mod.weight.dim() > 1 else 1
            n = mod.weight.shape[0]
            dense = pos * n * d // (mod.groups if isinstance(mod, nn.Conv2d) else 1)
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            rows.append(
                LayerCost(
                    name,
                    kind,
                    pos,
                    d,
                    n,
                    None,
                    None,
                    None,
                    dense,
                    dense,
                    0,
                    0,
                    0,
                    0,
                    dense,
                    dense * wa,
                    dense * wa,
                )
            )
    return rows


def totals(rows: list[LayerCost]) -> dict[str, float]:
    t = {
        key: sum(getattr(r, key) for r in rows)
        for key in (
            "macs_dense",
            "macs_nenni",
            "macs_exact",
            "macs_approx",
            "macs_projection",
            "adds_projection",
            "selection_ops",
            "bitops_dense",
            "bitops_nenni",
        )
    }
    t["mac_reduction"] = 1 - t["macs_nenni"] / t["macs_dense"] if t["macs_dense"] else 0.0
    t["bitops_reduction"] = 1 - t["bitops_nenni"] / t["bitops_dense"] if t["bitops_dense"] else 0.0
    t["mac_ideal_speedup"] = t["macs_dense"] / t["macs_nenni"] if t["macs_nenni"] else 1.0
    t["bitops_ideal_speedup"] = t["bitops_dense"] / t["bitops_nenni"] if t["bitops_nenni"] else 1.0
    return t


def cost_report(model: nn.Module, input_shape: tuple[int, ...], assumptions: Assumptions | None = None) -> dict:
    """Per-layer rows, totals and the assumptions, ready for JSON and for `format_table`."""
    a = assumptions or Assumptions()
    rows = layer_costs(model, input_shape, a)
    bits = sorted({r_bits for r_bits in _approx_bits(model)}) or [a.weight_bits]
    return {
        "layers": [asdict(r) for r in rows],
        "totals": totals(rows),
        "assumptions": {
            **asdict(a),
            "approx_bits": bits,
            "text": a.describe(bits[0]),
            "macs_nenni": "exact essential + approximator + projection charged as dense float MACs",
            "per": "image",
        },
    }


def _approx_bits(model: nn.Module) -> set[int]:
    return {m.spec.approx_bits for m in model.modules() if isinstance(m, NenniLayer)}
