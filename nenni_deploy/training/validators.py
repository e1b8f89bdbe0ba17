"""Validators: extra metrics measured on held-out images after an epoch (see `loop.Validator`)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..attacks import PGD, straight_through
from .loop import Validator
from .methods import eval_mode, unwrap


def pgd_validator(
    x: torch.Tensor, y: torch.Tensor, attack: PGD, batch_size: int = 256, via: str = "nenni", name: str = "pgd_acc"
) -> Validator:
    """Accuracy (%) under `attack` on (x, y), reported as `name`: the metric robust early stopping selects on.

    The attack's fixed seed makes every epoch face the same random starts, so epochs compare like for like.
    Catastrophic overfitting of fast AT shows here first (PGD accuracy collapses while FGSM accuracy rises).
    """

    def validate(model: nn.Module) -> dict[str, float]:
        net = unwrap(model)
        correct = 0
        bpda = straight_through(net, via) if via != "nenni" else nullcontext()
        with eval_mode(net), bpda:
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                adv = attack.perturb(net, xb, yb)
                with torch.no_grad():
                    correct += int((net(adv).argmax(1) == yb).sum())
        return {name: 100 * correct / len(x)}

    return validate
