"""The Python API: one function per stage, over plain objects, each returning a result with `to_json()`.

    import nenni_deploy as nd

    train, test = nd.load_dataset("my_images/", "train"), nd.load_dataset("my_images/", "test")
    model = nd.load_model("model.py:build", weights="weights.pt", data=train)
    result = nd.calibrate(model, train, test, nd.CalibrateConfig(nd.NenniConfig(ratio=0.5)))
    result.save("runs/mine")
    tuned = nd.finetune(nd.open_model_dir("runs/mine"), train, test, nd.FinetuneConfig(), "runs/ft/train")
    tuned.save("runs/ft")
    nd.export_onnx(nd.open_model_dir("runs/ft"), "mine.onnx")
    pruned = nd.prune_model(model, train, test, nd.PruneJob(nd.PruneConfig(budget_macs=0.7)), "runs/pruned/train")
    pruned.save("runs/pruned")

The command line is a thin adapter over these functions (options -> config -> function -> print and write);
docs/api.md walks through every stage.
"""

from __future__ import annotations

from .app.calibrate import CalibrateConfig, CalibrationResult, calibrate
from .app.evaluate import TargetSpec, evaluate_target, open_target
from .app.export import CheckReport, ExportReport, check_onnx, export_onnx
from .app.finetune import FinetuneConfig, FinetuneResult, finetune
from .app.prune import PruneJob, PruneRun, prune_model
from .app.train import TrainRun, train_model
from .data import Dataset, DataSpec, load_dataset, subset
from .errors import NenniError
from .evaluation.api import EvalConfig, EvalReport, settings_for
from .exporters.export import ExportOptions
from .exporters.int8 import Int8Settings
from .models.source import ModelSource
from .nenni.config import NenniConfig
from .nenni.io import load_model_dir, save_model_dir
from .nenni.model import Model, load_model, open_model_dir
from .pruning import PruneConfig
from .training import TrainConfig
from .training.methods import MethodConfig

__all__ = [
    "CalibrateConfig",
    "CalibrationResult",
    "CheckReport",
    "DataSpec",
    "EvalConfig",
    "EvalReport",
    "Dataset",
    "ExportOptions",
    "ExportReport",
    "FinetuneConfig",
    "FinetuneResult",
    "Int8Settings",
    "MethodConfig",
    "Model",
    "ModelSource",
    "NenniConfig",
    "NenniError",
    "PruneConfig",
    "PruneJob",
    "PruneRun",
    "TrainConfig",
    "TargetSpec",
    "TrainRun",
    "calibrate",
    "check_onnx",
    "evaluate_target",
    "export_onnx",
    "finetune",
    "load_dataset",
    "load_model",
    "load_model_dir",
    "open_model_dir",
    "open_target",
    "prune_model",
    "save_model_dir",
    "settings_for",
    "subset",
    "train_model",
]
