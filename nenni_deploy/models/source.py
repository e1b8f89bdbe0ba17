"""Where a model's architecture comes from, recorded so that a model directory rebuilds it anywhere.

A `ModelSource` is either a registered architecture (`resnet20`) or a user's entry point (`model.py:build`,
`package.module:build`) with its keyword arguments, plus what the data told us (input shape, class count) and the
input normalisation the model was trained with. A model directory keeps a copy of the entry point's source file,
so it rebuilds without the original path and without the registry.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import NenniError, first_line
from ..files import sha256_file
from .checkpoint import load_checkpoint
from .entrypoint import call_entrypoint, is_file_module, looks_like_entrypoint, source_file, split_entrypoint
from .layers import Normalize
from .registry import create_model, list_models, model_info

SOURCE_FOLDER = "source"


class Normalized(nn.Module):
    """A user's model behind its input normalisation: it takes [0, 1] pixels, so attack budgets stay in pixel
    units and the exported graph normalises in its first ops."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


@dataclass
class ModelSource:
    arch: str | None = None  # a registered architecture
    entrypoint: str | None = None  # file.py:fn or package.module:fn; inside a model directory, relative to it
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # C, H, W
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None  # per channel, on the [0, 1] scale
    std: tuple[float, ...] | None = None
    origin: str | None = None  # the entry point as the user gave it (the copy is what rebuilds)
    source_sha256: str | None = None  # of the copied source file

    def __post_init__(self) -> None:
        if (self.arch is None) == (self.entrypoint is None):
            raise NenniError("a model source is either a registered architecture or an entry point")
        if self.input_shape is not None:
            self.input_shape = tuple(int(d) for d in self.input_shape)
        self.mean, self.std = check_normalization(self.mean, self.std, self.input_shape)

    @property
    def label(self) -> str:
        return self.arch or self.origin or str(self.entrypoint)

    def build(self, *, weights: str | os.PathLike | None = None) -> nn.Module:
        """The architecture (with `weights` loaded into it), behind its input normalisation, in eval mode."""
        if self.arch is not None:
            kwargs = dict(self.kwargs)
            if self.num_classes is not None:
                kwargs.setdefault("num_classes", self.num_classes)
            module = create_model(self.arch, **kwargs)
        else:
            module = self._call()
        if weights is not None:
            load_checkpoint(module, weights)
        if self.mean is not None:
            module = Normalized(module, self.mean, self.std)
        return module.eval()

    def _call(self) -> nn.Module:
        module_name, _ = split_entrypoint(self.entrypoint)
        if self.source_sha256 and is_file_module(module_name):
            copied = Path(module_name)
            if copied.is_file() and sha256_file(copied) != self.source_sha256:
                raise NenniError(f"{copied}: sha256 does not match config.json (the model source changed)")
        try:
            return call_entrypoint(self.entrypoint, self.kwargs)
        except NenniError as copy_failed:
            # A module copied out of its package loses its relative imports: the installed package may still be
            # importable by its original name.
            if self.origin and not is_file_module(split_entrypoint(self.origin)[0]) and self.origin != self.entrypoint:
                try:
                    return call_entrypoint(self.origin, self.kwargs)
                except NenniError:
                    pass
            raise copy_failed from None

    def located(self, base_dir: Path) -> ModelSource:
        """The source of a model directory, with its copied entry point named by an absolute path."""
        if self.entrypoint is None:
            return self
        module_name, func = split_entrypoint(self.entrypoint)
        if not is_file_module(module_name) or Path(module_name).is_absolute():
            return self
        return dataclasses.replace(self, entrypoint=f"{(Path(base_dir) / module_name).resolve()}:{func}")

    def packaged(self, folder: Path) -> ModelSource:
        """Copy the entry point's source file into `folder/source/` and point at the copy (relative to `folder`)."""
        if self.arch is not None:
            return self
        src = source_file(self.entrypoint)
        if src is None or not src.is_file():
            return self
        digest = sha256_file(src)
        if self.source_sha256 and digest != self.source_sha256:
            raise NenniError(f"{src}: sha256 does not match the recorded model source (the file changed)")
        _, func = split_entrypoint(self.entrypoint)
        target = Path(folder) / SOURCE_FOLDER / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        relative = f"{SOURCE_FOLDER}/{src.name}:{func}"
        return dataclasses.replace(
            self, entrypoint=relative, origin=self.origin or self.entrypoint, source_sha256=digest
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("input_shape", "mean", "std"):
            d[key] = list(d[key]) if d[key] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSource:
        from ..errors import dataclass_from_dict

        return dataclass_from_dict(cls, dict(d), "model source")


def check_normalization(
    mean: Sequence[float] | None, std: Sequence[float] | None, input_shape: Sequence[int] | None = None
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Per-channel mean and std (both or neither), std > 0, one value per input channel (or one for all)."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise NenniError("--mean and --std go together: give both or neither")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != len(std):
        raise NenniError(f"--mean has {len(mean)} values but --std has {len(std)}")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise NenniError(f"--std values must be finite and > 0 (and --mean finite), got mean {mean}, std {std}")
    channels = input_shape[0] if input_shape else None
    if channels is not None and len(mean) not in (1, channels):
        raise NenniError(f"--mean/--std have {len(mean)} values but the images have {channels} channels")
    if channels is not None and len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    return mean, std


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.49,0.48,0.45' -> floats; a malformed value is a one-line error naming the option."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise NenniError(f"{option} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


def source_for(
    spec: str,
    *,
    kwargs: dict[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ModelSource:
    """A registered name or an entry point, as the user typed it for --arch."""
    spec = str(spec)
    if spec in list_models():
        info = model_info(spec)
        return ModelSource(
            arch=spec,
            kwargs=dict(kwargs or {}),
            input_shape=tuple(input_shape or info.input_shape),
            num_classes=num_classes or info.num_classes,
            mean=mean,
            std=std,
        )
    if looks_like_entrypoint(spec):
        module, func = split_entrypoint(spec)
        if is_file_module(module):
            spec = f"{Path(module).resolve()}:{func}"  # this process may change directory; the copy comes later
        return ModelSource(
            entrypoint=spec,
            kwargs=dict(kwargs or {}),
            input_shape=tuple(input_shape) if input_shape else None,
            num_classes=num_classes,
            mean=mean,
            std=std,
            origin=spec,
        )
    raise NenniError(
        f"unknown model {spec!r}: not a registered architecture ({', '.join(list_models())}), "
        "an entry point path/to/file.py:FUNCTION or package.module:FUNCTION, or a model directory"
    )


def check_outputs(module: nn.Module, input_shape: Sequence[int], num_classes: int | None, label: str) -> int:
    """Run the model once on two blank images: it must return one row of `num_classes` scores per image."""
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *input_shape))
    except Exception as exc:  # the user's forward can fail in any way
        shape = "x".join(map(str, input_shape))
        raise NenniError(f"{label} fails on {shape} images: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NenniError(f"{label} must return one row of class scores per image, got {got} for a batch of 2")
    if num_classes is not None and out.shape[1] != num_classes:
        raise NenniError(f"{label} outputs {out.shape[1]} scores per image but the data has {num_classes} classes")
    return int(out.shape[1])
