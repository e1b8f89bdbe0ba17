"""Options and glue shared by the commands that compress and fine-tune (`nenni finetune`, `nenni prune`):
the distillation teacher and the budget allocation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import NenniError
from .options import _compose

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


def pop_allocation_config(kwargs: dict[str, Any]):
    """The AllocationConfig from the options, or None without a budget; the cache path is filled in later."""
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


def reallocate(model, nenni_config, allocation_config, x, y, run_dir: Path, resume: bool, progress: bool):
    """Allocate under the budget from the model's dense base, convert and fit anew; (model, config, result).

    Deterministic for the same inputs, so a resumed run rebuilds the same structure before its checkpoint loads.
    """
    import dataclasses

    from ..nenni.allocation import allocate, dense_base
    from ..nenni.calibrate import calibration_batches
    from ..nenni.convert import convert
    from ..nenni.fit import fit

    if allocation_config.cache is None:
        allocation_config = dataclasses.replace(allocation_config, cache=str(Path(run_dir) / "sensitivity.json"))
    result = allocate(model, nenni_config, x, y, allocation_config)
    if not result.chosen():
        raise NenniError(f"the budget {allocation_config.budget:g} leaves every layer dense: nothing to fine-tune")
    config = result.nenni_config(nenni_config)
    new = dense_base(model)
    convert(new, config)
    fit(new, calibration_batches(x, 2048, 256, config.seed), ridge=config.ridge, progress=progress)
    return new, config, result


def format_allocation(result) -> str:
    from ..nenni.allocation import format_allocation as fmt

    return fmt(result)


TEACHER_CHOICES = ("auto", "dense-base", "none")


def resolve_teacher(teacher: str, model, card: dict[str, Any], method, input_shape: tuple[int, ...]):
    """The frozen teacher module, or None (no distillation); checked for architecture and class count."""
    from ..nenni.io import load_nenni_model
    from ..nenni.layers import set_mode
    from ..training.methods import check_teacher, dense_base_teacher

    if teacher == "none":
        return None
    if teacher == "auto":
        if method.name != "standard":
            return None
        teacher = "dense-base"
    if method.name != "standard":
        raise NenniError(f"--teacher distils with --method standard only, not {method.name}")
    if teacher == "dense-base":
        return dense_base_teacher(model)
    path = Path(teacher)
    if not path.exists():
        raise NenniError(f"--teacher must be dense-base, none, auto or a model directory; {teacher} does not exist")
    t_model, t_card = load_nenni_model(path)
    if t_card.get("arch") != card.get("arch"):
        raise NenniError(f"teacher {teacher} is a {t_card.get('arch')}, the model a {card.get('arch')}")
    set_mode(t_model, "exact")
    check_teacher(model, t_model, input_shape, what=str(teacher))
    return t_model


def make_distill(teacher_model, teacher: str, model, **settings: Any):
    from ..nenni.layers import nenni_layers
    from ..training.methods import Distill

    name = "dense-base" if teacher in ("auto", "dense-base") else str(teacher)
    layers = tuple(nenni_layers(model)) if settings.get("feature_weight") else ()
    return Distill(teacher_model, teacher_name=name, feature_layers=layers, **settings)
