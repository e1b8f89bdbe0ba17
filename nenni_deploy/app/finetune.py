"""Fine-tuning a NENNI model with its masks in the loop, then saving it as a model directory.

The base weights train in their unfolded scale (ScaledConv2d/ScaledLinear keep the batch-norm factor apart),
which method.md 1.4 found decisive. After training, the residual RMS and fit error stored per layer are
re-measured with the new weights: they set the noise level of `--noise gaussian` models.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import Dataset
from ..errors import NenniError
from ..metrics import accuracy
from ..nenni.allocation import AllocationConfig, AllocationResult, reallocate
from ..nenni.config import NenniConfig
from ..nenni.convert import fold_batchnorm
from ..nenni.io import save_model_dir
from ..nenni.layers import nenni_layers, set_mode
from ..nenni.model import Model, open_model_dir
from ..training import TrainConfig, TrainResult, measure_fit, steps_per_epoch, train
from ..training.checkpoint import load_model
from ..training.methods import Distill, Method, MethodConfig, check_teacher, dense_base_teacher, method_record
from ..training.refit import calibration_batches
from .calibrate import check_data

TRAIN_SUBDIR = "train"
STATS_IMAGES = 1024  # training images used to re-measure the fit statistics after training
AUTO_MIN_STEPS = 600  # `epochs=None`: enough epochs for this many optimiser steps, and at least AUTO_MIN_EPOCHS
AUTO_MIN_EPOCHS = 2


TEACHERS = ("auto", "dense-base", "none")  # or a model directory


@dataclass
class FinetuneConfig:
    """Fine-tuning: the loop and its schedules (`train`), the method, distillation and the budget allocation."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=None, lr=0.01))
    method: MethodConfig = field(default_factory=MethodConfig)
    # Distillation: auto is the dense base for --method standard, none for adversarial methods; or a directory.
    teacher: str = "auto"
    distill_alpha: float = 0.9
    distill_temperature: float = 4.0
    distill_features: float = 0.0  # weight of matching each NENNI layer's output to the teacher's exact one
    allocation: AllocationConfig | None = None  # re-allocate per-layer ratio and k under a budget first
    eval_n: int | None = None  # test images evaluated before and after (None: all)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.eval_n is not None and self.eval_n < 1:
            raise NenniError(f"--eval-n must be >= 1, got {self.eval_n}")
        if self.teacher not in TEACHERS and not Path(self.teacher).is_dir():
            raise NenniError(
                f"--teacher must be {', '.join(TEACHERS)} or a model directory; {self.teacher} does not exist"
            )


def auto_epochs(n_train: int, config: TrainConfig) -> int:
    """Small data sets need many epochs for the same number of steps: aim at AUTO_MIN_STEPS optimiser steps."""
    per_epoch = steps_per_epoch(n_train, config)
    return max(AUTO_MIN_EPOCHS, math.ceil(AUTO_MIN_STEPS / per_epoch))


@dataclass
class FinetuneResult:
    model: Model
    result: TrainResult
    method: Method
    config: FinetuneConfig
    record: dict[str, Any]
    fit_stats: dict[str, dict[str, float]]
    nenni_config: NenniConfig
    allocation: AllocationResult | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.model.source.label,
            "model_dir": self.record["source"],
            "out": str(self.model.path) if self.model.path else None,
            **{k: v for k, v in self.record.items() if k != "stage"},
            "fit_stats": self.fit_stats,
            "history": self.result.history,
        }

    def save(self, out: str | os.PathLike) -> Path:
        """Write the model directory at `out`, keeping the run's checkpoints in out/train."""
        metrics = {
            **self.model.card.get("metrics", {}),
            "dense_accuracy": self.record["dense_accuracy"],
            "nenni_accuracy": self.record["nenni_accuracy_after"],
            "eval_images": self.record["eval_images"],
            "data": self.record["data"],
            "finetune": {k: v for k, v in self.record.items() if k not in ("stage", "config")},
        }
        base = self.model.base()
        path = save_keeping_run(
            Path(out),
            self.result.run_dir,
            self.model.module,
            source=self.model.source,
            config=self.nenni_config,
            specs=[layer.spec for layer in nenni_layers(self.model.module).values()],
            data=self.model.data,
            base_state=base.module.state_dict() if base.sha256 else None,
            dense_layers=self.model.card.get("dense_layers", []),
            metrics=metrics,
            history=[*self.model.card.get("history", []), self.record],
        )
        self.model.path = path
        return path


def finetune(
    model: Model,
    train_set: Dataset,
    test_set: Dataset,
    config: FinetuneConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Train the NENNI model in place with the NENNI forward pass (checkpoints in `run_dir`), keep its best epoch,
    and re-measure accuracy (NENNI, its exact layers, the original dense base) and the fit statistics."""
    if not model.is_nenni:
        raise NenniError(f"{model.label} has no NENNI layers: calibrate it first (`nenni calibrate`)")
    check_data(model, train_set)
    nenni_config = NenniConfig.from_dict(model.card["nenni"]) if model.card.get("nenni") else NenniConfig()
    input_shape = train_set.input_shape
    method = config.method.build(model.module, input_shape)
    teacher, teacher_name = resolve_teacher(config.teacher, model, method, input_shape)
    allocation = None
    if config.allocation is not None:
        alloc = config.allocation
        if alloc.cache is None:  # kept with the run: a resumed run does not measure again
            alloc = dataclasses.replace(alloc, cache=str(Path(run_dir) / "sensitivity.json"))
        module, nenni_config, allocation = reallocate(model.module, nenni_config, alloc, train_set.x, train_set.y)
        model = Model(module, model.source, "nenni", model.data, model.path, model.card)
    if teacher is not None:
        features = tuple(nenni_layers(model.module)) if config.distill_features else ()
        method = Distill(
            teacher,
            alpha=config.distill_alpha,
            temperature=config.distill_temperature,
            feature_weight=config.distill_features,
            feature_layers=features,
            label_smoothing=config.train.label_smoothing,
            teacher_name=teacher_name,
        )
    train_config = config.train
    if train_config.epochs is None:
        train_config = dataclasses.replace(train_config, epochs=auto_epochs(len(train_set), train_config))
    train_config = dataclasses.replace(train_config, refit_ridge=nenni_config.ridge)
    if config.method.validation_images:
        train_config = dataclasses.replace(train_config, best_metric="pgd_acc")
    eval_n = config.eval_n or len(test_set)
    test_x, test_y = test_set.x[:eval_n], test_set.y[:eval_n]
    bar = "evaluating" if config.progress else None

    def evaluate(mode: str) -> float:
        set_mode(model.module, mode)
        try:
            return accuracy(model.module, test_x, test_y, train_config.eval_batch_size, bar)
        finally:
            set_mode(model.module, "nenni")

    start = time.perf_counter()
    before = {"nenni": evaluate("nenni"), "exact": evaluate("exact")}
    result = train(
        model.module,
        train_set.x,
        train_set.y,
        train_config,
        run_dir,
        method=method,
        validators=config.method.validators(train_set.x, train_set.y, train_config),
        resume=resume,
        progress=config.progress,
        on_epoch=on_epoch,
    )
    load_model(result.best_path, model.module)
    set_mode(model.module, "nenni")
    # The stored residual RMS sets the noise of gaussian models, so it must follow the new weights first.
    stats = measure_fit(model.module, calibration_batches(train_set.x, STATS_IMAGES, train_config.eval_batch_size))
    after = {"nenni": evaluate("nenni"), "exact": evaluate("exact")}
    dense = accuracy(model.base().module, test_x, test_y, train_config.eval_batch_size, bar)
    record = {
        "stage": "finetune",
        "source": str(model.path) if model.path else None,
        "data": model.data.name if model.data else None,
        "method": method.name,
        "method_settings": method_record(method),
        "allocation": allocation.to_json() if allocation is not None else None,
        "trainable": train_config.trainable,
        "epochs": result.epoch,
        "steps": result.step,
        "best_epoch": result.best_epoch,
        "best_metric": train_config.best_metric,
        "best_value": result.best_value,
        "best_val_accuracy": result.best_value if train_config.best_metric == "val_acc" else None,
        "nenni_accuracy_before": before["nenni"],
        "exact_accuracy_before": before["exact"],
        "nenni_accuracy_after": after["nenni"],
        "exact_accuracy_after": after["exact"],
        "dense_accuracy": dense,
        "eval_images": len(test_x),
        "seconds": time.perf_counter() - start,
        "seconds_per_epoch": result.seconds_per_epoch,
        "config": train_config.to_dict(),
    }
    tuned = Model(model.module, model.source, "nenni", model.data, model.path, model.card)
    return FinetuneResult(
        tuned, result, method, dataclasses.replace(config, train=train_config), record, stats, nenni_config, allocation
    )


def resolve_teacher(teacher: str, model: Model, method: Method, input_shape: tuple[int, ...]):
    """The frozen distillation teacher and its name, or (None, None).

    `dense-base` is the dense model this one was made from, with its batch norms folded so that its layers carry
    the NENNI layers' names and outputs (for feature distillation); a directory must hold the same architecture.
    """
    if teacher == "none" or (teacher == "auto" and method.name != "standard"):
        return None, None
    if method.name != "standard":
        raise NenniError(f"--teacher distils with --method standard only, not {method.name}")
    if teacher in ("auto", "dense-base"):
        base = model.base()
        module = fold_batchnorm(copy.deepcopy(base.module)) if base.sha256 else dense_base_teacher(model.module)
        name = "dense-base"
    else:
        other = open_model_dir(teacher)
        if other.source.label != model.source.label:
            raise NenniError(f"teacher {teacher} is a {other.source.label}, the model a {model.source.label}")
        module = copy.deepcopy(other.module)
        set_mode(module, "exact")
        check_teacher(model.module, module, input_shape, what=str(teacher))
        name = str(teacher)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, name


def save_keeping_run(out: Path, run_dir: Path, module, **kwargs: Any) -> Path:
    """Write the model directory at `out` without losing the checkpoints in out/train.

    save_model_dir replaces its target whole, so the model is written beside it, the run directory moved
    into the new one, and the new directory renamed into place.
    """
    out, run_dir = out.resolve(), Path(run_dir).resolve()  # `--out .` has no name to stage beside
    staging = out.with_name(f".{out.name}.finetuned")
    shutil.rmtree(staging, ignore_errors=True)
    save_model_dir(staging, module, **kwargs)
    try:
        if run_dir.is_dir() and run_dir.parent == out:
            os.replace(run_dir, staging / run_dir.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as exc:
        raise NenniError(f"cannot write {out}: {exc.strerror or exc} (the result is in {staging})") from None
    return out
