"""Option groups shared by several commands (Polygraphy-style): each is a decorator adding a few options."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click
import torch

from ..errors import NenniError


def _compose(*decorators):
    def apply(func):
        for dec in reversed(decorators):
            func = dec(func)
        return func

    return apply


def arch_option():
    return click.option("--arch", required=True, help="Registered architecture (see `nenni info --models`).")


def data_options(default: str = "digits"):
    return _compose(
        click.option(
            "--data",
            "data_name",
            default=default,
            show_default=True,
            type=click.Choice(["digits", "cifar10"]),
            help="Data set (digits ships with scikit-learn).",
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder with CIFAR-10 (train.npz/test.npz or the python batches); else $NENNI_DATA_DIR.",
        ),
    )


def runtime_options():
    return _compose(
        click.option(
            "--threads",
            type=click.IntRange(1, 256),
            default=None,
            help="Intra-op threads for PyTorch (default: torch's choice).",
        ),
        click.option("--batch-size", type=click.IntRange(1, 100_000), default=256, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
    )


def json_option():
    return click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write a machine-readable summary here.",
    )


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary name in the same folder and rename, so a failure never leaves half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise NenniError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Options of `training_options`, named like the TrainConfig fields they set.
TRAIN_OPTION_FIELDS = (
    "epochs",
    "lr",
    "batch_size",
    "momentum",
    "weight_decay",
    "nesterov",
    "schedule",
    "warmup_epochs",
    "augment",
    "val_split",
    "max_steps_per_epoch",
    "eval_every",
    "grad_clip",
    "label_smoothing",
    "seed",
    "threads",
)


def training_options(epochs: int, lr: float):
    """The SGD loop's settings (nenni_deploy.training.TrainConfig) for every command that trains.

    Numbers are plain ints and floats, validated by TrainConfig, so a bad value is a one-line error.
    """
    from ..training.config import AUGMENTS, SCHEDULES

    return _compose(
        click.option("--epochs", type=int, default=epochs, show_default=True),
        click.option("--lr", type=float, default=lr, show_default=True, help="Peak learning rate (SGD)."),
        click.option("--batch-size", type=int, default=128, show_default=True),
        click.option("--momentum", type=float, default=0.9, show_default=True),
        click.option(
            "--weight-decay", type=float, default=5e-4, show_default=True, help="On conv/linear weights only."
        ),
        click.option("--nesterov/--no-nesterov", default=False, show_default=True),
        click.option(
            "--schedule",
            type=click.Choice(SCHEDULES),
            default="cosine",
            show_default=True,
            help="Per-step LR schedule; piecewise drops 10x at 50 % and 75 %.",
        ),
        click.option("--warmup-epochs", type=float, default=0.0, show_default=True),
        click.option(
            "--augment",
            type=click.Choice(AUGMENTS),
            default="auto",
            show_default=True,
            help="auto: crop+flip for 32x32 colour images, a 1-pixel shift otherwise.",
        ),
        click.option(
            "--val-split",
            type=float,
            default=0.1,
            show_default=True,
            help="Fraction of the train split held out for validation and the best checkpoint.",
        ),
        click.option(
            "--max-steps-per-epoch", type=int, default=None, help="Cap the steps per epoch (smoke tests, CPU budgets)."
        ),
        click.option("--eval-every", type=int, default=1, show_default=True, help="Validate every N epochs."),
        click.option("--grad-clip", type=float, default=0.0, show_default=True, help="Max gradient norm (0 = off)."),
        click.option("--label-smoothing", type=float, default=0.0, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--threads", type=int, default=None, help="Intra-op threads for PyTorch (default: torch's choice)."
        ),
        click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint (fresh start if none)."),
    )


def pop_train_config(kwargs: dict[str, Any], **settings: Any):
    """Take the `training_options` values out of a command's kwargs and build the TrainConfig."""
    from ..training.config import TrainConfig

    values = {name: kwargs.pop(name) for name in TRAIN_OPTION_FIELDS}
    return TrainConfig(**values, **settings)
