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


def model_options(required: bool = True):
    """The model a command starts from: a registered architecture, a user's entry point, or a model directory."""
    return _compose(
        click.option(
            "--arch",
            required=required,
            help="A registered architecture (`nenni info --models`), an entry point path/to/file.py:FUNCTION or "
            "package.module:FUNCTION returning an nn.Module, or a model directory.",
        ),
        click.option(
            "--arch-kwargs", default=None, help="""JSON keyword arguments for the entry point, e.g. '{"width": 2}'."""
        ),
        click.option(
            "--weights",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Checkpoint (.safetensors, or a torch state dict loaded with weights_only=True).",
        ),
        click.option(
            "--mean",
            default=None,
            help="Per-channel mean on the [0, 1] scale for a model trained on normalised inputs, e.g. "
            "0.485,0.456,0.406 (applied inside the model and exported as its first ops).",
        ),
        click.option("--std", default=None, help="Per-channel standard deviation on the [0, 1] scale (with --mean)."),
    )


MODEL_OPTION_FIELDS = ("arch", "arch_kwargs", "weights", "mean", "std")


def data_options():
    """The data set: built in, or the user's own folder (npz arrays or image folders)."""
    return _compose(
        click.option(
            "--data",
            "data_name",
            default=None,
            help="digits (ships with scikit-learn), cifar10, or a folder with train.npz/test.npz or "
            "train/<class>/ and test/<class>/ images.  [default: the model's own data set]",
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder with CIFAR-10 (train.npz/test.npz or the python batches); else $NENNI_DATA_DIR.",
        ),
        click.option("--image-size", default=None, help="Resize an image-folder data set to H,W (e.g. 64,64)."),
    )


def int8_options():
    """Static int8 quantization of an export (exporters.int8.Int8Settings)."""
    return _compose(
        click.option(
            "--int8",
            is_flag=True,
            help="Quantize to int8 (ONNX Runtime QDQ; the NENNI layers in their int8 form), calibrated on "
            "training images of --data / --data-dir (default: the data set the model records).",
        ),
        click.option(
            "--calib-n", type=click.IntRange(1), default=256, show_default=True, help="Calibration images (--int8)."
        ),
        click.option(
            "--calib-method",
            type=click.Choice(["minmax", "percentile", "entropy"]),
            default="minmax",
            show_default=True,
            help="Activation ranges from ONNX Runtime's calibrator (--int8).",
        ),
        click.option(
            "--calib-percentile",
            type=click.FloatRange(50, 100, min_open=True),
            default=99.999,
            show_default=True,
            help="Percentile kept by --calib-method percentile.",
        ),
        click.option(
            "--reduce-range/--no-reduce-range",
            default=None,
            help="7-bit weights in ORT's u8 x s8 kernels, which can saturate on CPUs without VNNI (--int8).  "
            "[default: on when this CPU lacks VNNI]",
        ),
    )


def int8_settings(int8: bool, calib_n: int, calib_method: str, calib_percentile: float, reduce_range):
    """The Int8Settings the --int8 options describe, or None without --int8."""
    if not int8:
        return None
    from ..exporters.int8 import Int8Settings

    return Int8Settings(
        calib_n=calib_n, calib_method=calib_method, percentile=calib_percentile, reduce_range=reduce_range
    )


def threads_option(help_text: str = "Intra-op threads (default: the library's choice)."):
    return click.option("--threads", type=click.IntRange(1, 256), default=None, help=help_text)


def batch_size_option(default: int = 256):
    return click.option("--batch-size", type=click.IntRange(1, 100_000), default=default, show_default=True)


def seed_option():
    return click.option("--seed", type=int, default=0, show_default=True)


def progress_option():
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")


def runtime_options():
    return _compose(threads_option(), batch_size_option(), seed_option())


def pop_model(kwargs: dict[str, Any], data=None):
    """Take the `model_options` values out of a command's kwargs and load the model they name."""
    from ..models.source import parse_floats
    from ..nenni.model import load_model

    values = {name: kwargs.pop(name) for name in MODEL_OPTION_FIELDS}
    return load_model(
        values["arch"],
        weights=values["weights"],
        kwargs=values["arch_kwargs"],
        mean=parse_floats(values["mean"], "--mean"),
        std=parse_floats(values["std"], "--std"),
        data=data,
    )


def model_and_data(kwargs: dict[str, Any], data_name, data_dir, image_size):
    """The model named by `model_options` and the data set (`data_options`, defaulting to the model's own):
    (model, data spec, train split, test split). The model is checked against the data before any work."""
    from ..models import list_models, model_info
    from ..models.source import source_for
    from ..nenni.model import data_for

    arch = kwargs["arch"]
    if Path(arch).is_dir():
        model = pop_model(kwargs)
        spec = data_for(model, data_name, data_dir, image_size)
        return model, spec, spec.load("train"), spec.load("test")
    if not data_name:
        if arch not in list_models():
            source_for(arch)  # an unknown name fails here, naming what --arch takes
            raise NenniError("--data is required with an entry point (digits, cifar10 or a folder)")
        data_name = model_info(arch).dataset
    spec = data_for(None, data_name, data_dir, image_size)
    train, test = spec.load("train"), spec.load("test")
    return pop_model(kwargs, data=train), spec, train, test


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


def write_json(path: Path, payload: dict[str, Any]) -> None:
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


def training_options(epochs: int | None, lr: float):
    """The SGD loop's settings (nenni_deploy.training.TrainConfig) for every command that trains.

    Numbers are plain ints and floats, validated by TrainConfig, so a bad value is a one-line error.
    """
    from ..training.config import AUGMENTS, SCHEDULES

    return _compose(
        click.option(
            "--epochs",
            type=int,
            default=epochs,
            show_default=epochs is not None,
            help=None if epochs is not None else "Default: enough for 600 optimiser steps (at least 2 epochs).",
        ),
        click.option("--lr", type=float, default=lr, show_default=True, help="Peak learning rate (SGD)."),
        batch_size_option(128),
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
        seed_option(),
        threads_option("Intra-op threads for PyTorch (default: torch's choice)."),
        click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint (fresh start if none)."),
    )


def pop_train_config(kwargs: dict[str, Any], **settings: Any):
    """Take the `training_options` values out of a command's kwargs and build the TrainConfig."""
    from ..training.config import TrainConfig

    values = {name: kwargs.pop(name) for name in TRAIN_OPTION_FIELDS}
    return TrainConfig(**values, **settings)


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


def pop_method(kwargs: dict[str, Any]):
    """Take the `method_options` values out of kwargs as a MethodConfig (checked: a bad value is one line)."""
    from ..training.methods import MethodConfig

    return MethodConfig(**{name: kwargs.pop(name) for name in METHOD_OPTION_FIELDS})


# -- compression recipes: distillation, schedules, budget allocation (nenni finetune) ------------------------------
def distill_weight_options():
    """How the KL term is weighed: shared by `finetune` (NENNI) and `prune` (static pruning)."""
    return _compose(
        click.option(
            "--distill-alpha", type=float, default=0.9, show_default=True, help="Weight of the KL term (1 - CE's)."
        ),
        click.option("--distill-temperature", type=float, default=4.0, show_default=True, help="Softmax temperature."),
    )


def distill_options():
    return _compose(
        click.option(
            "--teacher",
            default="auto",
            show_default=True,
            help="Distillation teacher: dense-base (the dense model this one was made from), a model directory of "
            "the same architecture, or none; auto: dense-base for --method standard, none otherwise.",
        ),
        distill_weight_options(),
        click.option(
            "--distill-features",
            type=float,
            default=0.0,
            show_default=True,
            help="Weight of feature distillation: each NENNI layer's output against the teacher's (0 = off).",
        ),
    )


DISTILL_OPTION_FIELDS = ("teacher", "distill_alpha", "distill_temperature", "distill_features")


def schedule_options():
    """NENNI fine-tuning schedules (TrainConfig fields)."""
    return _compose(
        click.option(
            "--anneal-epochs",
            type=float,
            default=0.0,
            show_default=True,
            help="Lower the essential ratio linearly from 1.0 to each layer's target over this many epochs.",
        ),
        click.option(
            "--approx-lr-scale",
            type=float,
            default=1.0,
            show_default=True,
            help="The approximators' learning rate as a multiple of --lr.",
        ),
        click.option(
            "--train-scale/--no-train-scale",
            default=False,
            show_default=True,
            help="Also train the folded batch-norm factor of every exact layer (in its unfolded parametrisation).",
        ),
        click.option(
            "--scale-lr-scale",
            type=float,
            default=0.1,
            show_default=True,
            help="With --train-scale: the scales' learning rate as a multiple of --lr.",
        ),
    )


SCHEDULE_OPTION_FIELDS = ("anneal_epochs", "approx_lr_scale", "train_scale", "scale_lr_scale")

ALLOCATION_OPTION_FIELDS = (
    "budget_macs",
    "budget_bitops",
    "alloc_ratios",
    "alloc_proj_dims",
    "alloc_images",
    "alloc_max_loss",
    "sensitivity_cache",
)


def allocation_options():
    return _compose(
        click.option(
            "--budget-macs",
            type=float,
            default=None,
            help="Re-allocate each layer's ratio and k to use at most this fraction of the dense MACs, "
            "maximising predicted accuracy (per-layer sensitivity, knapsack).",
        ),
        click.option("--budget-bitops", type=float, default=None, help="The same under a BitOPs budget."),
        click.option(
            "--alloc-ratios",
            default="0.125,0.25,0.375,0.5,0.625,0.75",
            show_default=True,
            help="Candidate essential ratios for the allocation.",
        ),
        click.option("--alloc-proj-dims", default="n/8,n/4", show_default=True, help="Candidate projection sizes k."),
        click.option(
            "--alloc-images", type=int, default=512, show_default=True, help="Training images the sensitivity uses."
        ),
        click.option(
            "--alloc-max-loss",
            type=float,
            default=None,
            help="A layer whose loss rises more than this at a candidate never takes it (too sensitive).",
        ),
        click.option(
            "--sensitivity-cache",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Sensitivity JSON to reuse (refused if from another model); default OUT/train/sensitivity.json.",
        ),
    )


def pop_allocation(kwargs: dict[str, Any]):
    """The AllocationConfig from the options, or None without a budget."""
    from ..nenni.allocation import AllocationConfig

    v = {name: kwargs.pop(name) for name in ALLOCATION_OPTION_FIELDS}
    if v["budget_macs"] is not None and v["budget_bitops"] is not None:
        raise NenniError("give one of --budget-macs and --budget-bitops, not both")
    if v["budget_macs"] is None and v["budget_bitops"] is None:
        return None
    metric = "macs" if v["budget_macs"] is not None else "bitops"
    try:
        ratios = tuple(float(r) for r in v["alloc_ratios"].split(",") if r.strip())
    except ValueError:
        raise NenniError(f"--alloc-ratios must be comma-separated numbers, got {v['alloc_ratios']!r}") from None
    return AllocationConfig(
        budget=v[f"budget_{metric}"],
        metric=metric,
        ratios=ratios,
        proj_dims=tuple(k.strip() for k in v["alloc_proj_dims"].split(",") if k.strip()),
        images=v["alloc_images"],
        max_loss_increase=v["alloc_max_loss"],
        cache=str(v["sensitivity_cache"]) if v["sensitivity_cache"] else None,
    )
