"""Model surgery: fold batch norm, find the eligible layers, and swap them for NENNI layers in place.

`conversion_plan(model, config)` decides, from the traced graph, which layers become NENNI layers (with a spec
each) and which stay dense and why; `convert(model, config)` carries the plan out and returns the specs, so that
the same structure can be rebuilt from JSON with `apply_specs` before loading saved weights. Any architecture
that torch.fx traces and that is built from standard layers converts: grouped and depthwise convolutions, string
padding and widths that an N:M pattern does not divide stay dense with a note.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import NenniError, UnsupportedLayerError, first_line
from .config import LayerSpec, NenniConfig, resolve_proj_dim
from .layers import NenniLayer, ScaledConv2d, ScaledLinear
from .projection import layer_seed

# Activations that clip (or nearly clip) negative inputs: a layer feeding one ranks its neurons by signed value.
_RECTIFIER_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.CELU, nn.Softplus,
    nn.Hardtanh,
)  # fmt: skip
_RECTIFIER_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.mish, F.elu, F.celu, F.softplus, F.hardtanh,
    torch.relu, torch.nn.functional.relu_,
}  # fmt: skip
_RECTIFIER_METHODS = {"relu", "relu_"}
# Ops between a layer and its activation that keep the sign of each neuron (a batch norm right after a layer is
# folded into it, so its sign is the layer's own).
_PASS_THROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d)
_PASS_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.dropout, torch.flatten}
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}


@dataclass
class LayerInfo:
    name: str
    module: nn.Module
    order: int
    rectified: bool  # the output reaches a rectifying activation through sign-preserving ops only


@dataclass
class ConversionPlan:
    """Which layers become NENNI layers (their specs) and which stay dense, with the reason for each."""

    specs: list[LayerSpec]
    dense: list[dict[str, str]] = field(default_factory=list)  # {"name": ..., "reason": ...}


class _LeafTracer(fx.Tracer):
    """Folded and NENNI layers are leaves, so that a folded (or converted) model can be analysed again."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ScaledConv2d, ScaledLinear, NenniLayer)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _LeafTracer().trace(model))
    except Exception as exc:  # fx raises many types; the user needs one line, naming where
        where = _untraceable_module(model)
        at = f" in module {where[0]!r} ({where[1]})" if where else ""
        raise NenniError(
            f"cannot analyse the model with torch.fx{at}: {type(exc).__name__}: {first_line(exc)} "
            "(data-dependent Python control flow cannot be traced)"
        ) from None


def _untraceable_module(model: nn.Module, prefix: str = "") -> tuple[str, str] | None:
    """The deepest submodule that fx cannot trace on its own, as (name, class)."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        try:
            fx.symbolic_trace(child)
        except Exception:
            return _untraceable_module(child, f"{full}.") or (full, type(child).__name__)
    return None


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _single_module_user(gm: fx.GraphModule, node: fx.Node, types: tuple) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), types):
        return user
    return None


def _fold(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """scale = gamma / sqrt(var + eps); bias = beta + scale * (b - mean); the weight keeps its own scale."""
    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(s)
        conv.bias.copy_(beta + s * (conv.bias - bn.running_mean))
        conv.scale.copy_(conv.scale * s)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every conv / linear by its Scaled* form and fold a directly following batch norm into it (in place).

    A batch norm that does not directly follow a conv or linear (pre-activation blocks) stays as it is.
    """
    gm = _trace(model)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (ScaledConv2d, ScaledLinear)):
            continue
        if isinstance(mod, nn.Conv2d):
            new = ScaledConv2d.from_conv(mod)
            bn_types: tuple = (nn.BatchNorm2d,)
        elif isinstance(mod, nn.Linear):
            new = ScaledLinear.from_linear(mod)
            bn_types = (nn.BatchNorm1d,)
        else:
            continue
        bn_node = _single_module_user(gm, node, bn_types)
        if bn_node is not None:
            _fold(new, gm.get_submodule(bn_node.target))
            _set(model, bn_node.target, nn.Identity())
        _set(model, node.target, new)
    return model


def analyse(model: nn.Module) -> list[LayerInfo]:
    """Conv and linear layers in execution order, with whether each feeds a residual addition."""
    gm = _trace(model)
    infos: list[LayerInfo] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, (nn.Conv2d, nn.Linear, NenniLayer)):
            continue
        infos.append(LayerInfo(node.target, mod, len(infos), _rectified(gm, node)))
    return infos


def _is(gm: fx.GraphModule, node: fx.Node, modules: tuple, functions: set, methods: set) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _rectified(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether large negative outputs are clipped anyway: a residual addition, a concatenation, a normalisation
    with its own sign or anything unknown before the activation means they matter (rank by magnitude)."""
    while len(node.users) == 1:
        (user,) = node.users
        if _is(gm, user, _RECTIFIER_MODULES, _RECTIFIER_FUNCTIONS, _RECTIFIER_METHODS):
            return True
        if not _is(gm, user, _PASS_THROUGH, _PASS_FUNCTIONS, _PASS_METHODS):
            return False
        node = user
    return False


def eligible(infos: list[LayerInfo], config: NenniConfig) -> tuple[list[LayerInfo], list[dict[str, str]]]:
    """Default: every conv and linear but the first conv and the classifier (the last layer); or by pattern.
    Returns the chosen layers and, for every other one, why it stays dense."""
    dense: dict[str, str] = {}
    if config.include is None:
        first_conv = next((i.name for i in infos if isinstance(i.module, nn.Conv2d)), None)
        last = infos[-1].name if infos else None
        if first_conv is not None:
            dense[first_conv] = "first convolution (next to the pixels; dense by default)"
        if last is not None:
            dense[last] = "classifier (dense by default)"
        chosen = [i for i in infos if i.name not in dense]
    else:
        chosen = [i for i in infos if any(fnmatch.fnmatchcase(i.name, p) for p in config.include)]
        if not chosen:
            names = ", ".join(i.name for i in infos[:8])
            raise NenniError(f"no layer matches --include {config.include}; layers are: {names}, ...")
        dense.update({i.name: "not matched by --include" for i in infos if i not in chosen})
    kept = []
    for i in chosen:
        if any(fnmatch.fnmatchcase(i.name, p) for p in config.exclude):
            dense[i.name] = "matched by --exclude"
        else:
            kept.append(i)
    return kept, [{"name": i.name, "reason": dense[i.name]} for i in infos if i.name in dense]


def _check_supported(info: LayerInfo, config: NenniConfig) -> None:
    mod = info.module
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            kind = "depthwise" if mod.groups == mod.in_channels else "grouped"
            raise UnsupportedLayerError(f"{kind} convolution (groups={mod.groups}) stays dense")
        if mod.padding_mode != "zeros":
            raise UnsupportedLayerError(f"padding_mode {mod.padding_mode!r} stays dense")
        if isinstance(mod.padding, str):
            raise UnsupportedLayerError(f"string padding {mod.padding!r} stays dense")
    elif not isinstance(mod, nn.Linear):
        raise UnsupportedLayerError(f"{type(mod).__name__} is not a conv or linear layer")
    n = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
    if config.granularity == "nm" and n % config.nm[1]:
        raise UnsupportedLayerError(f"{n} output channels are not a multiple of M={config.nm[1]} for N:M")


def make_spec(info: LayerInfo, config: NenniConfig) -> LayerSpec:
    """The layer's spec; raises UnsupportedLayerError (with the reason) for a layer that must stay dense."""
    _check_supported(info, config)
    mod = info.module
    is_conv = isinstance(mod, nn.Conv2d)
    n = mod.out_channels if is_conv else mod.out_features
    d = int(mod.weight[0].numel())
    granularity = config.granularity
    nm = config.nm if granularity == "nm" else None
    rank = config.rank if config.rank != "auto" else ("signed" if info.rectified else "magnitude")
    return LayerSpec(
        name=info.name,
        kind="conv" if is_conv else "linear",
        in_dim=d,
        out_dim=n,
        proj_dim=resolve_proj_dim(config.proj_dim_for(info.name), n, d),
        ratio=nm[0] / nm[1] if nm else config.ratio_for(info.name),
        granularity=granularity,
        nm=nm,
        rank=rank,
        noise=config.noise,
        noise_scale=config.noise_scale,
        seed=layer_seed(config.seed, info.order),
        approx_bits=int(config.approx_bits),
    )


def apply_specs(model: nn.Module, specs: list[LayerSpec]) -> nn.Module:
    """Wrap the named (already folded) layers in NENNI layers built from their specs (in place)."""
    for spec in specs:
        try:
            mod = _get(model, spec.name)
        except AttributeError:
            raise NenniError(f"the model has no layer {spec.name!r} named in the NENNI config") from None
        if not isinstance(mod, (ScaledConv2d, ScaledLinear)):
            raise NenniError(f"layer {spec.name!r} is {type(mod).__name__}; fold batch norm before converting")
        _set(model, spec.name, NenniLayer(mod, spec))
    return model


def conversion_plan(model: nn.Module, config: NenniConfig) -> ConversionPlan:
    """Which layers convert (their specs) and which stay dense and why; the model is not changed."""
    model.eval()
    infos = analyse(model)  # before folding: batch norms still show where the activations are
    chosen, dense = eligible(infos, config)
    specs = []
    for info in chosen:
        try:
            specs.append(make_spec(info, config))
        except UnsupportedLayerError as exc:
            dense.append({"name": info.name, "reason": str(exc)})
    if not specs:
        reasons = "; ".join(f"{d['name']}: {d['reason']}" for d in dense[:6])
        raise NenniError(f"no layer of this model can be converted to NENNI ({reasons or 'no conv or linear layer'})")
    order = {i.name: i.order for i in infos}
    dense.sort(key=lambda d: order[d["name"]])
    return ConversionPlan(specs, dense)


def apply_plan(model: nn.Module, plan: ConversionPlan) -> list[LayerSpec]:
    """Fold batch norm and wrap the planned layers (in place); the approximators are zero until `fit` runs."""
    fold_batchnorm(model)
    apply_specs(model, plan.specs)
    return plan.specs


def convert(model: nn.Module, config: NenniConfig) -> list[LayerSpec]:
    return apply_plan(model, conversion_plan(model, config))
