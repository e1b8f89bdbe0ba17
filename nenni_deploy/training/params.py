"""Which parameters train, and which of them get weight decay."""

from __future__ import annotations

from torch import nn

from ..errors import NenniError
from ..nenni.layers import ScaledConv2d, ScaledLinear, nenni_layers


def approximator_names(model: nn.Module) -> set[str]:
    """Qualified names of every NENNI approximator parameter (W~ and b~)."""
    return {f"{name}.{p}" for name in nenni_layers(model) for p in ("approx_weight", "approx_bias")}


def scale_names(model: nn.Module) -> set[str]:
    """Qualified names of the folded batch-norm factors (ScaledConv2d / ScaledLinear `scale`)."""
    return {f"{name}.scale" for name, m in model.named_modules() if isinstance(m, (ScaledConv2d, ScaledLinear))}


def select_trainable(model: nn.Module, trainable: str, train_scale: bool = False) -> dict[str, nn.Parameter]:
    """Mark parameters trainable by selector and return them by name.

    'base': every parameter that is not an approximator (the exact layers' weight and bias, including the
    layers NENNI leaves alone such as the first conv and the classifier, and any batch norm left unfolded);
    'approx': the approximators only; 'both': everything. The folded batch-norm factors (`scale`) train only
    with `train_scale` (and a selector that trains the base). Buffers (proj, residual_rms) never train.
    The NENNI masks need no handling: they are computed under no_grad, so they are constants in backward.
    """
    approx = approximator_names(model)
    scales = scale_names(model)
    chosen: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        is_approx = name in approx
        train = trainable == "both" or (trainable == "approx") == is_approx
        if name in scales:
            train = train and train_scale
        p.requires_grad_(train)
        if train:
            chosen[name] = p
    if not chosen:
        what = "approximator (the model has no NENNI layers)" if trainable == "approx" else "trainable"
        raise NenniError(f"--train {trainable}: no {what} parameters to train")
    return chosen


def decayed_names(model: nn.Module) -> set[str]:
    """Conv and linear weights (exact layers included); biases, norms and approximators are not decayed.

    Decay on the approximators would pull the fitted W~ toward zero, away from the least-squares solution.
    """
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


def param_groups(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    weight_decay: float,
    approx_lr_scale: float = 1.0,
    scale_lr_scale: float = 1.0,
) -> list[dict]:
    """SGD groups: decayed base weights, undecayed base parameters, the approximators and the folded batch-norm
    scales (both undecayed, each at its own multiple of the rate: the loop multiplies each group's `lr_scale`
    into the schedule's rate). Empty groups are left out."""
    decay = decayed_names(model)
    approx = approximator_names(model)
    scales = scale_names(model)
    own = approx | scales

    def group(name: str, names, wd: float, lr_scale: float) -> dict:
        return {"params": [params[n] for n in names], "weight_decay": wd, "group": name, "lr_scale": lr_scale}

    groups = [
        group("decay", [n for n in params if n in decay and n not in own], weight_decay, 1.0),
        group("no_decay", [n for n in params if n not in decay and n not in own], 0.0, 1.0),
        group("approx", [n for n in params if n in approx], 0.0, approx_lr_scale),
        group("scale", [n for n in params if n in scales], 0.0, scale_lr_scale),
    ]
    return [g for g in groups if g["params"]]
