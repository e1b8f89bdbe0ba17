"""The model every stage takes and gives: a PyTorch module, how to rebuild it, and where it came from."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..data import Dataset, DataSpec
from ..errors import NenniError
from ..models.source import ModelSource, check_outputs, source_for
from .io import BaseModel, data_spec, load_base_model, load_model_dir, model_source, save_model_dir
from .layers import nenni_layers


@dataclass
class Model:
    """A classifier (images in [0, 1], NCHW, in; one row of class scores out) and its provenance.

    `source` rebuilds the architecture anywhere; `data` is the data set it was made with (later stages default
    to it); `path` and `card` are set when it was loaded from a model directory.
    """

    module: nn.Module
    source: ModelSource
    kind: str = "dense"  # dense, pruned or nenni
    data: DataSpec | None = None
    path: Path | None = None
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path) if self.path else self.source.label

    @property
    def input_shape(self) -> tuple[int, ...]:
        if not self.source.input_shape:
            raise NenniError(f"{self.label}: the input shape is unknown (give the data set it takes)")
        return tuple(self.source.input_shape)

    @property
    def is_nenni(self) -> bool:
        return bool(nenni_layers(self.module))

    def base(self) -> BaseModel:
        """The dense model this one was made from, as it was (itself for a dense model in memory)."""
        if self.path is not None:
            return load_base_model(self.path, self.module)
        if self.kind != "dense":
            raise NenniError(f"{self.label}: the dense base of an unsaved {self.kind} model is unknown")
        return BaseModel(self.module, None)

    def save(self, out: str | os.PathLike, **fields: Any) -> Path:
        """Write as a model directory (dense or pruned here; NENNI models are saved by their stage's result)."""
        return save_model_dir(out, self.module, source=self.source, kind=self.kind, data=self.data, **fields)


def load_model(
    spec: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    kwargs: dict[str, Any] | str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    data: Dataset | None = None,
) -> Model:
    """A model directory, a registered architecture or an entry point (`file.py:fn`, `package.module:fn`) with
    `weights` and `kwargs`. With `data` (a training split), the input shape and class count come from it, the
    model is run once to check that it returns one row of that many scores per image, and the data set is
    recorded (later stages default to it)."""
    if isinstance(kwargs, str):
        kwargs = parse_kwargs(kwargs)
    path = Path(spec)
    if path.is_dir():
        if weights is not None or kwargs or mean is not None:
            raise NenniError(f"{path} is a model directory: it brings its own weights, arguments and normalisation")
        return open_model_dir(path)
    source = source_for(
        str(spec),
        kwargs=kwargs,
        input_shape=data.input_shape if data is not None else None,
        num_classes=data.num_classes if data is not None else None,
        mean=mean,
        std=std,
    )
    module = source.build(weights=weights)
    if source.input_shape:
        classes = check_outputs(module, source.input_shape, source.num_classes, source.label)
        source.num_classes = source.num_classes or classes
    return Model(module, source, "dense", data.spec if data is not None else None)


def open_model_dir(path: str | os.PathLike) -> Model:
    module, card = load_model_dir(path)
    return Model(module, model_source(card, path), card["kind"], data_spec(card), Path(path), card)


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """--arch-kwargs: a JSON object of keyword arguments for the entry point."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NenniError(f"--arch-kwargs must be a JSON object like '{{\"num_classes\": 5}}' ({exc.msg})") from None
    if not isinstance(value, dict):
        raise NenniError(f"--arch-kwargs must be a JSON object, got {type(value).__name__}")
    return value


def data_for(model: Model | None, name: str | None, data_dir=None, image_size=None) -> DataSpec:
    """--data if given, else the data set the model records, else the one a registered architecture is built for."""
    if name:
        return DataSpec.create(name, data_dir, image_size)
    recorded = model.data if model is not None else None
    if recorded is not None:
        if data_dir is not None or image_size is not None:
            return DataSpec.create(recorded.name, data_dir or recorded.dir, image_size or recorded.image_size)
        return recorded
    if model is not None and model.source.arch:
        from ..models import model_info

        return DataSpec.create(model_info(model.source.arch).dataset, data_dir, image_size)
    raise NenniError("the model records no data set: pass --data (digits, cifar10 or a folder)")
