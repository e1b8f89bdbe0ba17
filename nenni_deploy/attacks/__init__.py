"""Attacks shared by evaluation and adversarial training (one implementation of each)."""

from __future__ import annotations

from .adaptive import straight_through
from .autoattack import autoattack
from .ensemble import LogitEnsemble
from .features import capture, cosine_distance, feature_objective, features, module_named
from .pgd import (
    OBJECTIVES,
    PGD,
    Objective,
    ce_objective,
    fgsm_rs,
    margin_loss,
    margin_objective,
    mi_fgsm,
    project,
)

__all__ = [
    "OBJECTIVES",
    "LogitEnsemble",
    "PGD",
    "Objective",
    "autoattack",
    "capture",
    "ce_objective",
    "cosine_distance",
    "feature_objective",
    "features",
    "module_named",
    "fgsm_rs",
    "margin_loss",
    "margin_objective",
    "mi_fgsm",
    "project",
    "straight_through",
]
