"""Robustness as deployed: open what is evaluated (a model directory, ARCH with weights, an ONNX export with its
source, or any ONNX classifier as a black box), take the test images, the surrogates and a replay file, and run
the evaluation (`evaluation.api.evaluate`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import Dataset
from ..errors import NenniError
from ..evaluation.advfile import load_adversarial
from ..evaluation.api import EvalConfig, EvalReport, evaluate
from ..evaluation.blackbox import BlackBoxTarget, load_blackbox_target, load_surrogate_models
from ..evaluation.targets import Target, load_target, looks_like_onnx
from ..runtime.classifier import PixelConvention


@dataclass
class TargetSpec:
    """What to evaluate, as a user names it."""

    target: str | os.PathLike  # a model directory, ARCH or file.py:fn (with weights), or an .onnx file
    weights: str | os.PathLike | None = None
    source: str | os.PathLike | None = None  # the model directory an .onnx was exported from (white-box)
    dense: bool = False  # a model directory's dense base
    pixels: PixelConvention | None = None  # what a black-box ONNX graph expects of its input
    batch_size: int = 256
    threads: int | None = None


def open_target(spec: TargetSpec) -> Target:
    """A PyTorch target, an ONNX file with its source, or an ONNX file alone (a black box)."""
    if looks_like_onnx(spec.target) and spec.source is None:
        if spec.weights is not None:
            raise NenniError("--weights is not used with an ONNX target (its weights are inside the file)")
        if spec.dense:
            raise NenniError("--dense is for a model directory, not an ONNX file")
        pixels = spec.pixels or PixelConvention()
        return load_blackbox_target(Path(spec.target), pixels, batch_size=spec.batch_size, threads=spec.threads)
    if spec.pixels is not None:
        raise NenniError(
            "--input-range, --mean, --std and --layout describe the input of an ONNX graph evaluated as a black box "
            "(an .onnx TARGET without --source); this target takes [0, 1] NCHW images"
        )
    weights = Path(spec.weights) if spec.weights is not None else None
    source = Path(spec.source) if spec.source is not None else None
    return load_target(spec.target, weights=weights, source=source, dense=spec.dense)


def evaluate_target(
    target: Target,
    test: Dataset,
    config: EvalConfig,
    *,
    n: int | None = None,
    surrogates: Sequence[str] = (),
    adv_from: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate `target` on the first `n` images of `test` (all if it has fewer, with a note): the attacks that
    apply, transfer from `surrogates` (and, for a NENNI model, always from its dense base), a replayed file."""
    notes = []
    n = len(test) if n is None else n
    if n > len(test):
        notes.append(f"--n {n}: the {test.name} test set has {len(test)} images; evaluating all of them")
        n = len(test)
    x, y = test.x[:n].float().contiguous(), test.y[:n]
    if isinstance(target, BlackBoxTarget):
        target.bind(x, test.num_classes)
    specs = list(surrogates)
    if target.nenni and target.source is not None and "base" not in specs:
        # The dense model with the same weights is always a surrogate: the attacker knows it for free.
        specs.insert(0, "base")
    wants_transfer = config.attacks is None or "transfer" in config.attacks
    models = load_surrogate_models(specs, target, x, test.num_classes) if wants_transfer else []
    replay = load_adversarial(adv_from, x, y, config.settings.norm, config.eps) if adv_from else None
    report = evaluate(target, x, y, config, surrogates=models, replay=replay, notes=notes, log=log)
    report.data.update(name=test.name, split="test", first=n)
    return report


def data_for_target(target: Target, name: str | None, data_dir=None, image_size=None) -> Dataset:
    """--data, else the data set the target records; a model made for one data set is not evaluated on another."""
    from ..data import DataSpec

    chosen = name or target.dataset
    if not chosen:
        raise NenniError("the model records no data set: pass --data")
    if target.dataset and name and DataSpec.create(name).name != DataSpec.create(target.dataset).name:
        raise NenniError(f"the model is built for {target.dataset}, not --data {name}")
    return DataSpec.create(chosen, data_dir, image_size).load("test")
