"""Training a dense model (from scratch or a checkpoint) with any method; the run directory becomes a model
directory (config.json + weights.safetensors beside the checkpoints), so every later stage takes it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import Dataset
from ..errors import NenniError
from ..metrics import accuracy
from ..nenni.model import Model
from ..training import TrainConfig, TrainResult, train
from ..training.checkpoint import load_model
from ..training.methods import Method, MethodConfig, method_record
from .calibrate import check_data


@dataclass
class TrainRun:
    """A finished training run: the model at its best epoch, the loop's result and the test accuracy."""

    model: Model
    result: TrainResult
    method: Method
    config: TrainConfig
    test_accuracy: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "arch": self.model.source.label,
            "data": self.model.data.name if self.model.data else None,
            "method": self.method.name,
            **self.extra,
            "epochs": r.epoch,
            "steps": r.step,
            "test_accuracy": self.test_accuracy,
            "method_settings": method_record(self.method),
            "best_metric": self.config.best_metric,
            "best_value": r.best_value,
            "best_val_accuracy": r.best_value if self.config.best_metric == "val_acc" else None,
            "best_epoch": r.best_epoch,
            "seconds_per_epoch": r.seconds_per_epoch,
            "run_dir": str(r.run_dir),
            "model_dir": str(self.model.path) if self.model.path else None,
            "config": self.config.to_dict(),
            "history": r.history,
        }

    def save(self, out: str | os.PathLike | None = None) -> Path:
        """Write the dense model directory into the run directory (or `out`), keeping its checkpoints."""
        out = Path(out) if out is not None else self.result.run_dir
        record = {k: v for k, v in self.to_json().items() if k not in ("history", "config", "model_dir")}
        self.model.save(
            out,
            metrics={"test_accuracy": self.test_accuracy, "data": record["data"]},
            history=[*self.model.card.get("history", []), {"stage": "train", **record}],
            in_place=out.exists(),
        )
        self.model.path = out
        return out


def train_model(
    model: Model,
    train_set: Dataset,
    test_set: Dataset,
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    method: MethodConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    weights_label: str | None = None,
) -> TrainRun:
    """Train `model.module` in place on `train_set` (validation split held out by seed), checkpointing every epoch
    in `run_dir`; the model ends at its best epoch (by validation accuracy, or PGD accuracy for adversarial
    methods) and is evaluated on `test_set`."""
    if model.is_nenni:
        raise NenniError(f"{model.label} is a NENNI model: fine-tune it with `nenni finetune`")
    check_data(model, train_set)
    method_config = method or MethodConfig()
    built = method_config.build(model.module, train_set.input_shape, config.label_smoothing)
    if method_config.validation_images:
        config = dataclasses.replace(config, best_metric="pgd_acc")
    validators = method_config.validators(train_set.x, train_set.y, config)
    result = train(
        model.module,
        train_set.x,
        train_set.y,
        config,
        run_dir,
        method=built,
        validators=validators,
        resume=resume,
        progress=progress,
        on_epoch=on_epoch,
    )
    load_model(result.best_path, model.module)
    model.module.eval()
    test_acc = accuracy(model.module, test_set.x, test_set.y, config.eval_batch_size)
    return TrainRun(model, result, built, config, test_acc, {"weights": weights_label})
