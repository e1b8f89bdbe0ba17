"""Attacks shared by evaluation and adversarial training (one implementation of each)."""

from __future__ import annotations

from .adaptive import straight_through
from .features import capture, cosine_distance, feature_objective, features, module_named
from .pgd import OBJECTIVES, PGD, Objective, ce_objective, fgsm_rs, margin_loss, margin_objective, project

__all__ = [
    "OBJECTIVES",
    "PGD",
    "Objective",
    "capture",
    "ce_objective",
    "cosine_distance",
    "feature_objective",
    "features",
    "module_named",
    "fgsm_rs",
    "margin_loss",
    "margin_objective",
    "project",
    "straight_through",
]
