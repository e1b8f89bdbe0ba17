"""Static channel pruning (torch-pruning) to a MAC budget, then fine-tuning with distillation from the unpruned
model: the compression a user would pick first, with the same commands and model directories as NENNI."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import Dataset
from ..errors import NenniError
from ..metrics import accuracy
from ..nenni.io import save_model_dir, state_of
from ..nenni.model import Model, open_model_dir
from ..pruning import PruneConfig, prune
from ..training import TrainConfig, TrainResult, train
from ..training.checkpoint import load_model
from ..training.methods import Distill, Method, Standard, method_record
from .calibrate import check_data
from .finetune import auto_epochs, save_keeping_run

INIT_SUBDIR = "pruned-init"  # the pruned, not yet fine-tuned model: a resumed run rebuilds its widths from it
TEACHERS = ("dense", "none")


@dataclass
class PruneJob:
    """How to prune and how to fine-tune the pruned model."""

    prune: PruneConfig
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=None, lr=0.01))
    teacher: str = "dense"  # distil from the unpruned model, or train on the labels alone
    distill_alpha: float = 0.9
    distill_temperature: float = 4.0
    eval_n: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise NenniError(f"--teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.eval_n is not None and self.eval_n < 1:
            raise NenniError(f"--eval-n must be >= 1, got {self.eval_n}")


@dataclass
class PruneRun:
    model: Model  # kind "pruned"
    dense: Model
    result: TrainResult
    method: Method
    pruning: dict[str, Any]
    record: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        p = self.pruning
        return {
            "data": self.record["data"],
            "dense_accuracy": self.record["dense_accuracy"],
            "accuracy": self.record["pruned_accuracy_after"],
            "eval_images": self.record["eval_images"],
            "macs_ratio": p["macs_ratio"],
            "macs_dense": p["macs_dense"],
            "macs_pruned": p["macs_pruned"],
            "pruning": p,
        }

    def to_json(self) -> dict[str, Any]:
        out = str(self.model.path) if self.model.path else None
        return {**self.record, "pruning": self.pruning, "out": out, "history": self.result.history}

    def save(self, out: str | os.PathLike) -> Path:
        """The pruned model directory (with the unpruned model as its base), keeping the checkpoints in out/train."""
        path = save_keeping_run(
            Path(out),
            self.result.run_dir,
            self.model.module,
            source=self.model.source,
            kind="pruned",
            data=self.model.data,
            base_state=state_of(self.dense.module),
            metrics=self.metrics,
            history=[*self.dense.card.get("history", []), self.record],
        )
        self.model.path = path
        return path


def prune_model(
    model: Model,
    train_set: Dataset,
    test_set: Dataset,
    job: PruneJob,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> PruneRun:
    """Prune a copy of the dense `model` to `job.prune.budget_macs` of its MACs and fine-tune it (checkpoints in
    `run_dir`); the pruned widths are kept in run_dir/pruned-init so that --resume rebuilds them."""
    if model.kind != "dense":
        raise NenniError(f"{model.label} is a {model.kind} model: prune the dense model it was made from")
    check_data(model, train_set)
    log = log or (lambda _line: None)
    run_dir = Path(run_dir)
    init_dir = run_dir / INIT_SUBDIR
    start = time.perf_counter()
    if resume and (init_dir / "config.json").is_file():
        pruned = open_model_dir(init_dir)
        pruning = pruned.card["metrics"]["pruning"]
        log(f"resuming: pruned widths from {init_dir}")
    else:
        result = prune(model.module, train_set.x, train_set.y, job.prune)
        pruning = {**result.to_json(), "importance": job.prune.importance, "budget_macs": job.prune.budget_macs}
        pruned = Model(result.model, model.source, "pruned", model.data)
        save_model_dir(init_dir, pruned.module, source=model.source, kind="pruned", metrics={"pruning": pruning})
    pruned.data, pruned.path = model.data, None
    config = job.train
    if config.epochs is None:
        config = dataclasses.replace(config, epochs=auto_epochs(len(train_set), config))
    eval_n = job.eval_n or len(test_set)
    test_x, test_y = test_set.x[:eval_n], test_set.y[:eval_n]
    bar = "evaluating" if job.progress else None
    dense_acc = accuracy(model.module, test_x, test_y, config.eval_batch_size, bar)
    before = accuracy(pruned.module, test_x, test_y, config.eval_batch_size, bar)
    if job.teacher == "dense":
        method: Method = Distill(
            model.module,
            alpha=job.distill_alpha,
            temperature=job.distill_temperature,
            label_smoothing=config.label_smoothing,
            teacher_name="dense",
        )
    else:
        method = Standard(label_smoothing=config.label_smoothing)
    result = train(
        pruned.module,
        train_set.x,
        train_set.y,
        config,
        run_dir,
        method=method,
        resume=resume,
        progress=job.progress,
        on_epoch=on_epoch,
    )
    load_model(result.best_path, pruned.module)
    pruned.module.eval()
    after = accuracy(pruned.module, test_x, test_y, config.eval_batch_size, bar)
    record = {
        "stage": "prune",
        "source": str(model.path) if model.path else model.source.label,
        "data": model.data.name if model.data else None,
        "method": method.name,
        "method_settings": method_record(method),
        "epochs": result.epoch,
        "steps": result.step,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_value,
        "dense_accuracy": dense_acc,
        "pruned_accuracy_before": before,
        "pruned_accuracy_after": after,
        "eval_images": len(test_x),
        "seconds": time.perf_counter() - start,
        "seconds_per_epoch": result.seconds_per_epoch,
        "config": config.to_dict(),
    }
    return PruneRun(pruned, model, result, method, pruning, record)
