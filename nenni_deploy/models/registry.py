"""Model registry: every architecture by name, with the metadata the pipeline needs, and one factory."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from nenni_deploy.errors import NenniError
from nenni_deploy.models.checkpoint import load_checkpoint

# How the NENNI converter ranks neurons of a layer that feeds a residual addition: by magnitude, because a
# large negative value there survives the addition (see docs/method.md in ../shared), or by signed value.
PRE_RESIDUAL_RULES = ("magnitude", "signed")

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    input_shape: tuple[int, int, int]
    num_classes: int
    dataset: str
    default_pre_residual: str
    checkpoints: str = ""  # the published checkpoints it loads as they are, and their file names

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FACTORIES: dict[str, ModelFactory] = {}
_INFOS: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    *,
    family: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    dataset: str,
    default_pre_residual: str = "magnitude",
    checkpoints: str = "",
) -> Callable[[ModelFactory], ModelFactory]:
    """Register `factory(num_classes=..., **kwargs) -> nn.Module` under `name`."""
    if default_pre_residual not in PRE_RESIDUAL_RULES:
        raise ValueError(f"default_pre_residual must be one of {PRE_RESIDUAL_RULES}, not {default_pre_residual!r}")
    info = ModelInfo(name, family, tuple(input_shape), num_classes, dataset, default_pre_residual, checkpoints)

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is registered twice")
        _FACTORIES[name] = factory
        _INFOS[name] = info
        return factory

    return decorator


def list_models(*, family: str | None = None, dataset: str | None = None) -> list[str]:
    """Registered names, sorted, optionally only those of one family or data set."""
    return sorted(
        name
        for name, info in _INFOS.items()
        if (family is None or info.family == family) and (dataset is None or info.dataset == dataset)
    )


def model_info(name: str) -> ModelInfo:
    _check_known(name)
    return _INFOS[name]


def create_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model in eval mode, loading `weights` (any format `load_checkpoint` reads)."""
    _check_known(name)
    if num_classes is None:
        num_classes = _INFOS[name].num_classes
    model = _FACTORIES[name](num_classes=num_classes, **kwargs)
    if weights is not None:
        load_checkpoint(model, weights)
    return model.eval()


def _check_known(name: str) -> None:
    if name not in _FACTORIES:
        raise NenniError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
