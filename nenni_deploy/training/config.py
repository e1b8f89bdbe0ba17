"""Training settings: one dataclass that round-trips through JSON and is stored with every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import NenniError, dataclass_from_dict

SCHEDULES = ("cosine", "piecewise", "constant")
AUGMENTS = ("auto", "none", "crop_flip", "translate")
TRAINABLE = ("both", "base", "approx")

# Keys that may change when resuming without changing what the run computes (or that only extend it).
RESUMABLE_CHANGES = frozenset({"epochs", "threads", "eval_every"})


@dataclass
class TrainConfig:
    """One training run. `augment='auto'` is crop 32 + pad 4 + flip for 32x32 images, a 1-pixel shift otherwise."""

    epochs: int | None = 30  # None: chosen from the data set's size by the stage that trains (finetune)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # conv / linear weights only (see params.param_groups)
    nesterov: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    augment: str = "auto"
    val_split: float = 0.1  # fraction of the train split held out, chosen by `seed`
    seed: int = 0
    eval_every: int = 1
    max_steps_per_epoch: int | None = None
    threads: int | None = None
    eval_batch_size: int = 256
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    label_smoothing: float = 0.0
    trainable: str = "both"  # NENNI models: base weights, approximators, or both
    refit_every: int = 0  # refit the approximators in closed form every N epochs; 0 = never
    refit_images: int = 1024
    refit_ridge: float = 1e-4
    best_metric: str = "val_acc"  # higher is better
    # NENNI fine-tuning schedules (training/params.py, loop.py): the essential ratio falls linearly from 1.0 to
    # each layer's target over the first `anneal_epochs`; the approximators' rate is `approx_lr_scale` times
    # the base rate; `train_scale` trains the folded batch-norm factor (ScaledConv2d.scale) too.
    anneal_epochs: float = 0.0
    approx_lr_scale: float = 1.0
    train_scale: bool = False
    scale_lr_scale: float = 0.1  # the scale's rate as a multiple of the base rate (at 1.0 it diverged, see results)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check(
            self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 1),
            f"--epochs must be >= 1, got {self.epochs}",
        )
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(_finite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(_finite(self.momentum) and 0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        _check(not (self.nesterov and self.momentum == 0), "--nesterov needs a momentum > 0")
        _check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            f"--weight-decay must be >= 0, got {self.weight_decay}",
        )
        _check(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(
            _finite(self.warmup_epochs) and 0 <= self.warmup_epochs < (self.epochs or math.inf),
            f"--warmup-epochs must be in [0, epochs), got {self.warmup_epochs}",
        )
        _check(self.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        _check(
            _finite(self.val_split) and 0 <= self.val_split < 1, f"--val-split must be in [0, 1), got {self.val_split}"
        )
        _check(self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        _check(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            f"--max-steps-per-epoch must be >= 1, got {self.max_steps_per_epoch}",
        )
        _check(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        _check(self.eval_batch_size >= 1, f"eval batch size must be >= 1, got {self.eval_batch_size}")
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}")
        _check(
            _finite(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        _check(self.trainable in TRAINABLE, f"--train must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        _check(
            _finite(self.anneal_epochs) and 0 <= self.anneal_epochs <= (self.epochs or math.inf),
            f"--anneal-epochs must be in [0, epochs], got {self.anneal_epochs}",
        )
        _check(
            _finite(self.approx_lr_scale) and self.approx_lr_scale > 0,
            f"--approx-lr-scale must be > 0, got {self.approx_lr_scale}",
        )
        _check(
            _finite(self.scale_lr_scale) and self.scale_lr_scale > 0,
            f"--scale-lr-scale must be > 0, got {self.scale_lr_scale}",
        )
        _check(self.refit_every >= 0, f"--refit-every must be >= 0, got {self.refit_every}")
        _check(self.refit_images >= 1, f"refit images must be >= 1, got {self.refit_images}")
        _check(_finite(self.refit_ridge) and self.refit_ridge >= 0, f"refit ridge must be >= 0, got {self.refit_ridge}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d, "training")

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of the settings that differ from `other` (for refusing an inconsistent resume)."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b[k]]


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise NenniError(message)
