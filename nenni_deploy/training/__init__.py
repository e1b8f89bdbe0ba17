"""Training: one loop (`train`) for plain and NENNI models, with pluggable methods and validators."""

from __future__ import annotations

from .augment import augment_batch, resolve_augment
from .config import TrainConfig
from .loop import TrainResult, Validator, split_indices, steps_per_epoch, train
from .methods import ADVERSARIAL, METHODS, Adversarial, Method, Standard, fast_at, make_method
from .params import param_groups, select_trainable
from .refit import measure_fit, refit_approximators
from .schedule import lr_at
from .validators import pgd_validator

__all__ = [
    "ADVERSARIAL",
    "METHODS",
    "Adversarial",
    "fast_at",
    "make_method",
    "pgd_validator",
    "Method",
    "Standard",
    "TrainConfig",
    "TrainResult",
    "Validator",
    "augment_batch",
    "lr_at",
    "measure_fit",
    "param_groups",
    "refit_approximators",
    "resolve_augment",
    "select_trainable",
    "split_indices",
    "steps_per_epoch",
    "train",
]
