"""Option groups shared by several commands (Polygraphy-style): each is a decorator adding a few options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from ..errors import NenniError
from ..files import atomic_output


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
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")


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


def parse_budget(value: str | float | None, option: str) -> float | None:
    """'8/255' or '0.0314' -> float; a malformed value is a one-line error naming the option."""
    if value is None or isinstance(value, float):
        return value
    try:
        if "/" in value:
            num, den = value.split("/", 1)
            return float(num) / float(den)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise NenniError(f"{option} must be a number or a fraction like 8/255, got {value!r}") from None


# Options of `method_options`, taken out of a command's kwargs by `pop_method`.
METHOD_OPTION_FIELDS = (
    "method",
    "eps",
    "attack_steps",
    "attack_alpha",
    "beta",
    "slim",
    "slim_layers",
    "attack_via",
    "val_pgd_n",
    "val_pgd_steps",
)


def method_options():
    """The training method (nenni_deploy.training.methods) and the PGD validation that picks the best epoch."""
    from ..training.methods import METHODS, VIAS

    return _compose(
        click.option(
            "--method",
            type=click.Choice(METHODS),
            default="standard",
            show_default=True,
            help="pgd: PGD-AT (Madry); fast: FGSM with random start (Wong et al.); trades; mart.",
        ),
        click.option("--eps", default="8/255", show_default=True, help="Linf budget in [0, 1] pixel units."),
        click.option("--attack-steps", type=int, default=None, help="PGD steps while training (default 10; fast: 1)."),
        click.option("--attack-alpha", default=None, help="Step size (default eps/4; fast: 1.25 eps)."),
        click.option("--beta", type=float, default=6.0, show_default=True, help="TRADES / MART robust-loss weight."),
        click.option(
            "--slim/--no-slim",
            default=False,
            show_default=True,
            help="SLIM: the attack adds lambda*(1-cos) of a random layer's features, lambda ~ U(-1, 1) per batch.",
        ),
        click.option(
            "--slim-layers",
            default="auto",
            show_default=True,
            help="Comma-separated layer names or fnmatch patterns SLIM draws from; auto: the residual blocks.",
        ),
        click.option(
            "--attack-via",
            type=click.Choice(VIAS),
            default="nenni",
            show_default=True,
            help="NENNI models: attack through the NENNI forward pass, or BPDA via the exact layers / approximators.",
        ),
        click.option(
            "--val-pgd-n",
            type=int,
            default=None,
            help="Validation images attacked with PGD after each evaluation; the best checkpoint is chosen on that "
            "accuracy (default: 500 for adversarial methods, 0 = off, for standard).",
        ),
        click.option("--val-pgd-steps", type=int, default=10, show_default=True, help="PGD steps of that validation."),
    )


def pop_method(kwargs: dict[str, Any], model, label_smoothing: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """Take the `method_options` values out of kwargs; return the method and the PGD validation settings.

    Checked here, before any file is written: a bad value is a one-line error.
    """
    from ..training.methods import make_method, resolve_slim_layers

    values = {name: kwargs.pop(name) for name in METHOD_OPTION_FIELDS}
    eps = parse_budget(values["eps"], "--eps")
    alpha = parse_budget(values["attack_alpha"], "--attack-alpha")
    slim_layers: list[str] = []
    if values["slim"]:
        patterns = [p.strip() for p in values["slim_layers"].split(",") if p.strip()]
        slim_layers = resolve_slim_layers(model, patterns or ["auto"])
    method = make_method(
        values["method"],
        eps=eps,
        steps=values["attack_steps"],
        alpha=alpha,
        beta=values["beta"],
        slim_layers=slim_layers,
        via=values["attack_via"],
        label_smoothing=label_smoothing,
    )
    adversarial = values["method"] != "standard"
    n = values["val_pgd_n"] if values["val_pgd_n"] is not None else (500 if adversarial else 0)
    if n < 0:
        raise NenniError(f"--val-pgd-n must be >= 0, got {n}")
    if values["val_pgd_steps"] < 1:
        raise NenniError(f"--val-pgd-steps must be >= 1, got {values['val_pgd_steps']}")
    if not 0 < eps <= 1:
        raise NenniError(f"--eps must be in (0, 1], got {values['eps']}")
    validation = {"n": n, "steps": values["val_pgd_steps"], "eps": eps, "via": values["attack_via"]}
    return method, validation


def pgd_validation(validation: dict[str, Any], x, y, config) -> list:
    """The PGD validator on the first n images of the loop's own held-out split (same seed, same split)."""
    from ..attacks import PGD
    from ..training import pgd_validator, split_indices

    if not validation["n"]:
        return []
    if config.val_split <= 0:
        raise NenniError("--val-pgd-n needs a validation split (--val-split > 0)")
    _, val_idx = split_indices(len(x), config.val_split, config.seed)
    val_idx = val_idx[: validation["n"]]
    eps, steps = validation["eps"], validation["steps"]
    attack = PGD(eps=eps, steps=steps, alpha=max(eps / 4, 2.5 * eps / steps))
    return [pgd_validator(x[val_idx], y[val_idx], attack, config.eval_batch_size, via=validation["via"])]
