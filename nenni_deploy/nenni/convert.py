"""Model surgery: fold batch norm, find the eligible layers, and swap them for NENNI layers in place.

`convert(model, config, input_shape)` returns the per-layer specs it applied, so that the same structure can be
rebuilt from JSON with `apply_specs` before loading saved weights.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..errors import NenniError, UnsupportedLayerError
from .config import LayerSpec, NenniConfig, resolve_proj_dim
from .layers import NenniLayer, ScaledConv2d, ScaledLinear
from .projection import layer_seed

_ADDS = {operator.add, operator.iadd, torch.add}
_PASS_THROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity)


@dataclass
class LayerInfo:
    name: str
    module: nn.Module
    order: int
    feeds_add: bool  # output reaches a residual addition before any nonlinearity


class _LeafTracer(fx.Tracer):
    """Folded and NENNI layers are leaves, so that a folded (or converted) model can be analysed again."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ScaledConv2d, ScaledLinear, NenniLayer)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _LeafTracer().trace(model))
    except Exception as exc:  # fx raises many types; the user needs one line
        raise NenniError(f"cannot analyse the model with torch.fx ({type(exc).__name__}: {exc})") from None


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
        infos.append(LayerInfo(node.target, mod, len(infos), _feeds_add(gm, node)))
    return infos


def _feeds_add(gm: fx.GraphModule, node: fx.Node) -> bool:
    while True:
        if len(node.users) != 1:
            return False
        (user,) = node.users
        if user.op == "call_function" and user.target in _ADDS:
            return True
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), _PASS_THROUGH):
            node = user
            continue
        return False


def eligible(infos: list[LayerInfo], config: NenniConfig) -> list[LayerInfo]:
    """Default: every conv and linear but the first conv and the classifier (the last layer); or by pattern."""
    if config.include is None:
        first_conv = next((i.name for i in infos if isinstance(i.module, nn.Conv2d)), None)
        last = infos[-1].name if infos else None
        chosen = [i for i in infos if i.name not in (first_conv, last)]
    else:
        chosen = [i for i in infos if any(fnmatch.fnmatchcase(i.name, p) for p in config.include)]
        if not chosen:
            names = ", ".join(i.name for i in infos[:8])
            raise NenniError(f"no layer matches --include {config.include}; layers are: {names}, ...")
    return [i for i in chosen if not any(fnmatch.fnmatchcase(i.name, p) for p in config.exclude)]


def _check_supported(info: LayerInfo) -> None:
    mod = info.module
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            raise UnsupportedLayerError(
                f"layer {info.name}: grouped convolution (groups={mod.groups}) is not supported"
            )
        if mod.padding_mode != "zeros":
            raise UnsupportedLayerError(f"layer {info.name}: padding_mode {mod.padding_mode!r} is not supported")
        if isinstance(mod.padding, str):
            raise UnsupportedLayerError(f"layer {info.name}: string padding {mod.padding!r} is not supported")
    elif not isinstance(mod, nn.Linear):
        raise UnsupportedLayerError(f"layer {info.name}: {type(mod).__name__} is not a conv or linear layer")


def make_spec(info: LayerInfo, config: NenniConfig) -> LayerSpec:
    _check_supported(info)
    mod = info.module
    is_conv = isinstance(mod, nn.Conv2d)
    n = mod.out_channels if is_conv else mod.out_features
    d = int(mod.weight[0].numel())
    granularity = config.granularity
    nm = config.nm if granularity == "nm" else None
    if nm and n % nm[1]:
        raise NenniError(
            f"layer {info.name}: {n} output channels are not a multiple of M={nm[1]} for N:M {nm[0]}:{nm[1]}"
        )
    rank = config.rank if config.rank != "auto" else ("magnitude" if info.feeds_add else "signed")
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


def convert(model: nn.Module, config: NenniConfig) -> list[LayerSpec]:
    """Fold batch norm and wrap every eligible layer; the approximators are zero until `fit` runs."""
    model.eval()
    infos = analyse(model)  # before folding: batch norms still show where residual adds are
    chosen = eligible(infos, config)
    specs = [make_spec(i, config) for i in chosen]
    fold_batchnorm(model)
    apply_specs(model, specs)
    return specs
